"""Task accuracy of a megavl checkpoint on a prepared dataset (e.g. the synthetic val split).

    python tools/evaluate.py --load CKPT --data DIR [--split val] [--limit N] [--out results.json] \\
        [--batch-size 8] [--max-new-tokens 64] [--tokenizer DIR] [--set KEY=VALUE ...]
    torchrun --nproc-per-node 2 tools/evaluate.py ...      # the model split over the processes

Every answer of the first N records is generated greedily from its question (earlier
answers of a multi-question record are given, as the record has them) and scored:
exact match for counting, reading (English and Arabic apart) and multi-image answers;
pointing by whether the point falls inside the named object (and its distance to the
true point, 0..1000 units); boxes by IoU >= 0.5. A malformed answer is wrong. Prints a
table; --out writes it as JSON with example answers. Exit status: 0 done, 2 bad input.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.eval.cli import add_checkpoint_args, add_evaluation_set_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    add_evaluation_set_args(parser)
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.config import ConfigError
    from megavl.convert.errors import ConversionError
    from megavl.eval.cli import evaluation_items
    from megavl.eval.generation import GenerationSettings
    from megavl.eval.loading import load_for_generation
    from megavl.eval.task_eval import evaluate_tasks
    from megavl.platform.distributed import shutdown

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        items = evaluation_items(args)
        model, config, platform, tokenizer = load_for_generation(args.load, args.tokenizer, args.overrides)
        results = evaluate_tasks(model, config, platform, tokenizer, items, settings, args.batch_size)
    except (ValueError, FileNotFoundError, ConfigError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(results.table())
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"load": args.load, "data": args.data, "limit": args.limit, **results.to_json()}, f,
                          ensure_ascii=False, indent=2)
                f.write("\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
