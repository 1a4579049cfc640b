"""Converts a Hugging Face Qwen2-VL / Qwen2.5-VL folder into a megavl checkpoint.

    python tools/convert_from_hf.py --hf HF_FOLDER --out DIR [--tensor N --pipeline N] [--no-verify]

DIR receives a layout-free dist_checkpointing checkpoint (load it under any
TP/PP layout), megavl_config.yaml (with the intended layout) and the source
config.json as hf_config.json. Exit status: 0 done, 1 logits differ beyond the
tolerance, 2 the model or checkpoint cannot be converted.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="new or empty folder for the megavl checkpoint")
    parser.add_argument("--tensor", type=int, default=1, help="intended tensor-parallel size (checked, recorded)")
    parser.add_argument("--pipeline", type=int, default=1, help="intended pipeline-parallel size (checked, recorded)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="compare logits with the Hugging Face model (default: on below 2e9 parameters)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference| (fp32)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    from megavl.config import ConfigError
    from megavl.convert import ConversionError, import_from_hf
    from megavl.platform.distributed import shutdown

    # Called from a process that already has a process group (e.g. tests), leave it up.
    owns_world = not dist.is_initialized()
    try:
        result = import_from_hf(
            args.hf, args.out, tensor=args.tensor, pipeline=args.pipeline,
            verify=args.verify, tolerance=args.tolerance,
        )
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_world:
            shutdown()
    if result.verification is not None and not result.verification.ok:
        print(f"error: {result.verification.describe()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
