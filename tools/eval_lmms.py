"""Runs lmms-eval on an exported Hugging Face folder with a task made from a megavl dataset.

    python tools/eval_lmms.py --hf HF_DIR --data DIR [--split val] [--limit N] [--task-dir DIR] \\
        [--max-new-tokens 64] [--out results.json] [--compare MEGAVL_RESULTS.json]

The task (megavl/eval/lmms_task.py) holds every answer of the first N records, read offline
from local files; lmms-eval's model is the folder loaded by transformers (AutoProcessor,
AutoModelForImageTextToText, trust_remote_code for megavl's own class), answering greedily.
Answers are scored by megavl's rules, per task group. --compare takes the JSON
tools/evaluate.py wrote for the same checkpoint and records and prints both accuracies side by
side. Exit status: 0 done (and, with --compare, the same accuracies), 1 the accuracies
differ, 2 bad input.
"""

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.eval.cli import add_evaluation_set_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="folder tools/convert_to_hf.py wrote (with the tokenizer)")
    add_evaluation_set_args(parser)
    parser.add_argument("--task-dir", help="where to write the lmms-eval task (default: a temporary folder)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", help="write lmms-eval's accuracies here as JSON")
    parser.add_argument("--compare", help="tools/evaluate.py's JSON for the same records, to compare with")
    return parser.parse_args(argv)


def _megavl_accuracies(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    return {key[:-len("/accuracy")]: value for key, value in metrics.items() if key.endswith("/accuracy")}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.eval import lmms_task
    from megavl.eval.cli import evaluation_items

    try:
        if not os.path.isfile(os.path.join(args.hf, "processor_config.json")):
            raise ValueError(f"--hf {args.hf}: no processor_config.json; export with --tokenizer so the "
                             "folder has the tokenizer and processor lmms-eval needs")
        items = evaluation_items(args)
        expected = _megavl_accuracies(args.compare) if args.compare else None
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    task_dir = args.task_dir or tempfile.mkdtemp(prefix="megavl_lmms_")
    lmms_task.write_task(items, task_dir, args.max_new_tokens)
    accuracies, answers = lmms_task.run(args.hf, task_dir)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"hf": args.hf, "data": args.data, "limit": args.limit, "accuracy": accuracies,
                       "answers": answers}, f, indent=2, ensure_ascii=False)
            f.write("\n")
    print(f"lmms-eval task {lmms_task.TASK_NAME} ({len(items)} answers, task folder {task_dir}):")
    same = True
    print(f"{'task':<12} {'lmms-eval':>9}" + (f" {'megavl':>9}" if expected else ""))
    for group, value in accuracies.items():
        line = f"{group:<12} {100 * value:>8.1f}%"
        if expected is not None:
            theirs = expected.get(group, float("nan"))
            agree = math.isclose(value, theirs, abs_tol=1e-9)
            same &= agree
            line += f" {100 * theirs:>8.1f}%" + ("" if agree else "  differs")
        print(line)
    if expected is not None:
        print("the accuracies agree" if same else "the accuracies differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
