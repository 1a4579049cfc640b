"""Converts a Hugging Face Qwen2-VL / Qwen2.5-VL folder into a megavl checkpoint.

    python tools/convert_from_hf.py --hf HF_FOLDER --out DIR [--tensor N --pipeline N] [--no-verify]

A Qwen3-MoE language model (Qwen3MoeForCausalLM) is imported together with the
vision tower and adapter of a Qwen2.5-VL folder (whose own LM is ignored):

    python tools/convert_from_hf.py --hf QWEN3_MOE_FOLDER --vision-from QWEN2_5_VL_FOLDER --out DIR

and verified part by part: the LM's logits on text against Qwen3MoeForCausalLM,
the vision tower + adapter's image embeddings against the Qwen2.5-VL visual module.

DIR receives a layout-free dist_checkpointing checkpoint (load it under any
TP/PP layout), megavl_config.yaml (with the intended layout) and the source
config.json as hf_config.json (the --vision-from one as hf_vision_config.json).
Exit status: 0 done, 1 logits differ beyond the tolerance, 2 the model or
checkpoint cannot be converted.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.convert.cli import add_verification_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument(
        "--vision-from", help="Qwen2.5-VL folder giving the vision tower and adapter of a language-model-only --hf"
    )
    parser.add_argument("--out", required=True, help="new or empty folder for the megavl checkpoint")
    parser.add_argument("--tensor", type=int, default=1, help="intended tensor-parallel size (checked, recorded)")
    parser.add_argument("--pipeline", type=int, default=1, help="intended pipeline-parallel size (checked, recorded)")
    add_verification_options(parser, "the Hugging Face model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.convert import import_from_hf
    from megavl.convert.cli import run_conversion

    return run_conversion(lambda: import_from_hf(
        args.hf, args.out, tensor=args.tensor, pipeline=args.pipeline, vision_from=args.vision_from,
        verify=args.verify, tolerance=args.tolerance,
    ))


if __name__ == "__main__":
    sys.exit(main())
