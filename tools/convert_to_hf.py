"""Exports a megavl checkpoint as a Hugging Face folder: Qwen2-VL / Qwen2.5-VL, or for a model
composed from a SigLIP / CLIP tower and a text LM, LLaVA or Idefics3.

    python tools/convert_to_hf.py --load DIR --out HF_FOLDER [--tokenizer PATH] [--max-shard-size 2GB]

DIR is a converted checkpoint (with megavl_config.yaml) or a training
checkpoint (root with `latest`, or one iter_* folder), saved under any layout.
The result loads with transformers' from_pretrained. A model with features
Hugging Face's own classes lack (model.lm.image_attention: bidirectional,
active vision-only LoRA adapters) is exported to megavl's remote-code class
(MegavlQwen2_5_VLForConditionalGeneration, load it with
trust_remote_code=True); a model no supported class reproduces is refused
with every architecture's reasons. Exit status: 0 done, 1 logits differ
beyond the tolerance, 2 the model cannot be exported.

A model with a Qwen3-MoE language model (imported with --vision-from) exports
its language model only, as a Qwen3MoeForCausalLM folder verified on text:

    python tools/convert_to_hf.py --load DIR --out HF_FOLDER --language-model-only
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.convert.cli import add_verification_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="megavl checkpoint folder")
    parser.add_argument("--out", required=True, help="new or empty folder for the Hugging Face model")
    parser.add_argument("--tokenizer", help="tokenizer folder to save beside the model")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument(
        "--language-model-only", action="store_true",
        help="write only the LM, as Qwen3MoeForCausalLM (no vision tower or adapter)",
    )
    parser.add_argument("--architecture", help="Hugging Face architecture name (default: the one that fits)")
    add_verification_options(parser, "the exported model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.convert import export_to_hf
    from megavl.convert.cli import run_conversion

    return run_conversion(lambda: export_to_hf(
        args.load, args.out, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
        architecture=args.architecture, language_model_only=args.language_model_only,
        verify=args.verify, tolerance=args.tolerance,
    ))


if __name__ == "__main__":
    sys.exit(main())
