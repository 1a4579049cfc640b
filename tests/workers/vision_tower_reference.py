"""Compares megavl's SigLIP and CLIP towers with Hugging Face's under tensor parallelism
(tests/tower_reference.py); rank 0 writes {kind: max error per image} to --out."""

import argparse
import json
import os
import sys

TESTS = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(TESTS, ".."))
sys.path.insert(0, TESTS)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import tower_reference
    from conftest import TINY_CONFIG
    from megavl.config import load_config
    from megavl.platform.distributed import init_distributed, shutdown

    layout = init_distributed(load_config(str(TINY_CONFIG), [f"parallel.tensor={args.tensor}"]))
    errors = {kind: tower_reference.max_errors(kind, args.tensor) for kind in tower_reference.CASES}
    if layout.rank == 0:
        with open(args.out, "w") as f:
            json.dump(errors, f)
    shutdown()


if __name__ == "__main__":
    main()
