"""Converts Hugging Face folders into a megavl checkpoint: a Qwen2-VL / Qwen2.5-VL model, a
Qwen3-MoE LM with a Qwen2.5-VL tower, or a VLM composed from a vision tower and a text LM.

    python tools/convert_from_hf.py --hf HF_FOLDER --out DIR [--tensor N --pipeline N] [--no-verify]

A Qwen3-MoE language model (Qwen3MoeForCausalLM) is imported together with the
vision tower and adapter of a Qwen2.5-VL folder (whose own LM is ignored):

    python tools/convert_from_hf.py --hf QWEN3_MOE_FOLDER --vision-from QWEN2_5_VL_FOLDER --out DIR

and verified part by part: the LM's logits on text against Qwen3MoeForCausalLM,
the vision tower + adapter's image embeddings against the Qwen2.5-VL visual module.

A VLM composed from a vision tower and a text-only language model, with a new projector:

    python tools/convert_from_hf.py --vision SIGLIP_OR_CLIP_DIR --lm LM_DIR --adapter pixel_shuffle \
        --adapter-args factor=3 norm=after --out DIR

--vision is a SigLIP, SigLIP2 or CLIP folder (the vision model alone or the whole image-text model), or a
Qwen2-VL / Qwen2.5-VL folder whose tower (not its merger or LM) is taken, at native resolution
with --adapter merge_mlp or pixel_shuffle and factor=2;
--lm a Qwen2 / Qwen2.5, Qwen3, Llama (Llama 3, SmolLM2) or Qwen3-MoE causal LM. --adapter is
merge_mlp, pixel_shuffle or mlp (LLaVA's); --adapter-args: factor (patches merged per side),
norm (before | after | none), bias (true | false), ffn_hidden_size. --vision-layer picks the
tower's feature layer (default: SigLIP's last, CLIP's -2 as LLaVA). The special tokens the LM's
tokenizer (or --tokenizer) lacks are added, and DIR gets tokenizer/ and composition.json too.
Each side is verified against its Hugging Face model.

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
    parser.add_argument("--hf", help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument(
        "--vision-from", help="Qwen2.5-VL folder giving the vision tower and adapter of a language-model-only --hf"
    )
    composed = parser.add_argument_group("a composed model (instead of --hf)")
    composed.add_argument("--vision", help="SigLIP / CLIP folder, or a Qwen2(.5)-VL folder: the vision tower")
    composed.add_argument("--lm", help="text-only causal LM folder: the language model (and its tokenizer)")
    composed.add_argument("--adapter", choices=("merge_mlp", "pixel_shuffle", "mlp"), help="the new projector")
    composed.add_argument("--adapter-args", nargs="*", default=[], metavar="KEY=VALUE",
                          help="factor=N norm=before|after|none bias=true|false ffn_hidden_size=N")
    composed.add_argument("--vision-layer", type=int, help="the tower layer the projector reads (-1 last, -2 ...)")
    composed.add_argument("--tokenizer", help="tokenizer folder (default: the --lm folder's)")
    composed.add_argument("--vocab-multiple", type=int, default=128,
                          help="a grown embedding table is padded to a multiple of this")
    parser.add_argument("--out", required=True, help="new or empty folder for the megavl checkpoint")
    parser.add_argument("--tensor", type=int, default=1, help="intended tensor-parallel size (checked, recorded)")
    parser.add_argument("--pipeline", type=int, default=1, help="intended pipeline-parallel size (checked, recorded)")
    add_verification_options(parser, "the Hugging Face model")
    args = parser.parse_args(argv)
    composing = [f"--{name.replace('_', '-')}" for name in ("vision", "lm", "adapter") if getattr(args, name)]
    if args.hf and composing:
        parser.error(f"--hf converts one model; {' '.join(composing)} compose one: give one or the other")
    if not args.hf and len(composing) != 3:
        parser.error("give --hf HF_DIR, or --vision, --lm and --adapter together")
    if args.hf and (args.adapter_args or args.vision_layer is not None or args.tokenizer):
        parser.error("--adapter-args, --vision-layer and --tokenizer are for a composed model (--vision/--lm)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.convert import import_from_hf
    from megavl.convert.cli import run_conversion

    if not args.hf:
        from megavl.convert.composed import import_composed

        return run_conversion(lambda: import_composed(
            args.vision, args.lm, args.adapter, args.out, adapter_args=args.adapter_args,
            vision_layer=args.vision_layer, tokenizer_dir=args.tokenizer, tensor=args.tensor,
            pipeline=args.pipeline, vocab_multiple=args.vocab_multiple, verify=args.verify,
            tolerance=args.tolerance,
        ))
    return run_conversion(lambda: import_from_hf(
        args.hf, args.out, tensor=args.tensor, pipeline=args.pipeline, vision_from=args.vision_from,
        verify=args.verify, tolerance=args.tolerance,
    ))


if __name__ == "__main__":
    sys.exit(main())
