"""Loads a converted megavl checkpoint under a parallel layout and saves its logits on each
verification input (one document, the packed row), by name; launched by torchrun from the
converter tests."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True, help="converted checkpoint (with megavl_config.yaml)")
    parser.add_argument("--hf", required=True, help="the Hugging Face folder it came from (token ids)")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    parser.add_argument("--out", required=True, help="where rank 0 saves {input name: logits} (torch.save)")
    return parser.parse_args()


def main():
    args = parse_args()
    from megavl.config import load_config
    from megavl.convert.verify import megavl_logits, reserved_token_ids, verification_inputs
    from megavl.models.build import build_model
    from megavl.platform.distributed import init_distributed, shutdown
    from megavl.training.checkpoint import load_model_weights

    config = load_config(os.path.join(args.load, "megavl_config.yaml"), args.overrides)
    layout = init_distributed(config)
    with open(os.path.join(args.hf, "config.json")) as f:
        reserved = reserved_token_ids(json.load(f))
    model = build_model(config)
    load_model_weights(model, args.load)
    logits = {each.name: megavl_logits(model, config, each.batch(config))
              for each in verification_inputs(config, reserved)}
    if layout.rank == 0:
        torch.save(logits, args.out)
    shutdown()


if __name__ == "__main__":
    main()
