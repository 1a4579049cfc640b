"""Command-line options the evaluation tools share: the checkpoint to load (tools/generate.py,
tools/evaluate.py) and the evaluation set (tools/evaluate.py, tools/eval_lmms.py)."""

from __future__ import annotations

import argparse

from megavl.eval.items import EvalItem, load_items


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--load, --tokenizer and --set, as load_for_generation takes them."""
    parser.add_argument("--load", required=True, help="megavl checkpoint folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's data.tokenizer)")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override a field of the checkpoint's config, e.g. data.resolution.max_pixels=50176")


def add_evaluation_set_args(parser: argparse.ArgumentParser) -> None:
    """--data, --split and --limit: the records evaluation_items reads."""
    parser.add_argument("--data", required=True, help="prepared dataset folder (with .nv-meta)")
    parser.add_argument("--split", default=None, help="split part of the folder (default: its only one)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N records")


def evaluation_items(args: argparse.Namespace) -> list[EvalItem]:
    """The items of the records the options name; ValueError for a bad --limit or a set with no
    question to ask."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be >= 1")
    items = load_items(args.data, args.limit, args.split)
    if not items:
        raise ValueError(f"--data {args.data}: no question with an answer in the first records")
    return items
