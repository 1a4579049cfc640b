"""Adds special tokens to a megavl checkpoint's tokenizer and embedding tables.

    python tools/expand_vocab.py --load CKPT --tokenizer TOKDIR --add-tokens "<|tok_a|>" "<|tok_b|>" \\
        [--init mean|tokens|normal] [--init-std 0.02] [--vocab-multiple 128] --out OUTDIR

The new tokens take ids len(tokenizer) onwards. The embedding table (and an untied output
layer) keeps its size when they fit in its spare rows, else grows to the next multiple of
--vocab-multiple. The new tokens' rows start as the mean of the old tokens' rows (mean), the
mean of the rows of the pieces each token's text splits into under the old tokenizer (tokens),
or N(0, --init-std) (normal); all other weights and ids are unchanged.

OUTDIR receives the weights (dist_checkpointing, layout-free), megavl_config.yaml, the new
tokenizer in OUTDIR/tokenizer and vocab_expansion.json. The tool prints the --set values that
train only the new rows (train.stage=expand_embeddings train.embedding_rows_from=N ...).
Exit status: 0 done, 2 the checkpoint, tokenizer or tokens cannot be expanded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    from megavl.convert.vocab_expansion import DEFAULT_VOCAB_MULTIPLE, INITS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="megavl checkpoint (converted folder, or a training checkpoint)")
    parser.add_argument("--tokenizer", required=True, help="the checkpoint's tokenizer folder")
    parser.add_argument("--add-tokens", nargs="+", required=True, metavar="TOKEN", help="the new special tokens")
    parser.add_argument("--init", choices=INITS, default="mean", help="how the new tokens' rows start")
    parser.add_argument("--init-std", type=float, default=0.02, help="standard deviation of --init normal")
    parser.add_argument("--vocab-multiple", type=int, default=DEFAULT_VOCAB_MULTIPLE,
                        help="a table that must grow grows to a multiple of this")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init normal")
    parser.add_argument("--out", required=True, help="new or empty folder for the expanded checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megavl.convert.cli import run_conversion
    from megavl.convert.vocab_expansion import expand_vocab

    return run_conversion(lambda: expand_vocab(
        args.load, args.tokenizer, args.add_tokens, args.out, init=args.init, init_std=args.init_std,
        vocab_multiple=args.vocab_multiple, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
