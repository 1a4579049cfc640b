"""Converts a LLaVA JSON or chat-messages JSONL dataset with image files into energon-ready shards.

    python tools/prepare_data.py --format llava --input llava_665k.json --image-root images/ --out data/llava
    python tools/prepare_data.py --format messages --input chat.jsonl --image-root images/ --out data/chat \\
        --samples-per-shard 500 --split train

Samples that cannot be used are skipped and listed in OUT/report.jsonl with
the reason; see megavl/datasets/prepare.py for the formats and the reasons.
Exit status: 0 when samples were written (even with some skipped), 1 when
no sample was usable, 2 for unusable arguments or input.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runs from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavl.datasets.prepare import (  # noqa: E402
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_SAMPLES_PER_SHARD,
    FORMATS,
    REPORT,
    PrepareError,
    format_summary,
    prepare,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="llava: one JSON list; messages: JSONL")
    parser.add_argument("--input", required=True, help="the JSON or JSONL file")
    parser.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    parser.add_argument("--out", required=True, help="new or empty folder, or an earlier output of this tool")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
        help="images with more pixels (read from the header) are skipped as image_too_large",
    )
    parser.add_argument("--split", default="train", help="energon split part; also the shard name prefix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare(
            args.format,
            args.input,
            args.image_root,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_image_pixels=args.max_image_pixels,
            split=args.split,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    if summary["written"] == 0:
        print(f"error: no sample of {args.input} was usable; see {os.path.join(args.out, REPORT)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
