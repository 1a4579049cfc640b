"""Writes the synthetic vision-language corpus: WebDataset shards, a tokenizer and a manifest.

    python tools/make_synthetic_data.py --out data/synthetic
    python tools/make_synthetic_data.py --out /tmp/synth --train-samples 200 --val-samples 20 --seed 7
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runs from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavl.datasets.synthetic import generate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train/, val/, tokenizer/, manifest.json)")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical shards")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary, special tokens included")
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--task-weights", metavar="TASK=W,...",
                        help="mix the tasks in proportion, e.g. counting=3,reading=3,pointing=1 "
                             "(unnamed tasks get 0; default: all equally)")
    return parser.parse_args(argv)


def parse_task_weights(text: str | None) -> dict | None:
    if text is None:
        return None
    weights = {}
    for part in text.split(","):
        task, sep, value = part.partition("=")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"--task-weights {text!r}: expected TASK=NUMBER,..., got {part!r}")
    return weights


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = _generate(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seconds = time.perf_counter() - start
    _report(manifest, args.out, seconds)


def _generate(args: argparse.Namespace) -> dict:
    return generate(
        args.out,
        train_samples=args.train_samples,
        val_samples=args.val_samples,
        seed=args.seed,
        vocab_size=args.vocab_size,
        samples_per_shard=args.samples_per_shard,
        task_weights=parse_task_weights(args.task_weights),
    )


def _report(manifest: dict, out: str, seconds: float) -> None:
    for split, info in manifest["splits"].items():
        tasks = ", ".join(f"{task} {n}" for task, n in info["tasks"].items())
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards ({tasks}; "
              f"{info['languages']['ar']} Arabic)")
    print(f"tokenizer: {manifest['tokenizer']['vocab_size']} tokens")
    print(f"wrote {out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
