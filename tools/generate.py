"""Answers questions about images with a megavl checkpoint.

    python tools/generate.py --load CKPT --image FILE [--image FILE ...] --prompt TEXT [--prompt TEXT ...] \\
        [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--seed 0] [--tokenizer DIR] [--set KEY=VALUE ...]
    torchrun --nproc-per-node 2 tools/generate.py ...      # the model split over the processes

CKPT is a training checkpoint (root or iter_* folder) or a converted one, saved under any
layout; it loads split over this job's processes (tensor parallel, or a mixture-of-experts
model's experts). Each --prompt is one question about all the --image files, answered in one batch;
an image goes where a prompt writes <image>, else all images come before its text. The
prompt is laid out as in training (chat format, the training resolution policy, image
tokens attending to each other when the model was trained so); answers decode causally
with a KV cache, greedily unless --temperature > 0 (then nucleus sampling with --top-p).
--tokenizer defaults to the checkpoint's data.tokenizer. With --json, one JSON line per
answer. Exit status: 0 done, 2 bad input (the message says which).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.eval.cli import add_checkpoint_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a question (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.config import ConfigError
    from megavl.convert.errors import ConversionError
    from megavl.eval.generation import GenerationSettings, Generator
    from megavl.eval.items import prompt_item
    from megavl.eval.loading import load_for_generation
    from megavl.eval.task_eval import PromptBuilder
    from megavl.platform.distributed import shutdown

    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        items = [prompt_item(text, args.image, key=f"prompt-{i}") for i, text in enumerate(args.prompt)]
        model, config, platform, tokenizer = load_for_generation(args.load, args.tokenizer, args.overrides)
        prompts, failures = PromptBuilder(tokenizer, config).build(items)
        bad = [(item.key, reason) for item, reason in zip(items, failures) if reason]
        if bad:
            raise ValueError(f"cannot build the prompts: {bad}")
        answers = Generator.for_tokenizer(model, config, platform, tokenizer).generate(prompts, settings)
    except (ValueError, FileNotFoundError, ConfigError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for text, tokens in zip(args.prompt, answers):
            answer = tokenizer.decode(tokens, skip_special_tokens=False)
            if args.json:
                print(json.dumps({"prompt": text, "answer": answer, "tokens": tokens}, ensure_ascii=False))
            else:
                print(f"Q: {text}\nA: {answer}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
