"""Loads a converted Qwen3-MoE + Qwen2.5-VL-vision checkpoint under a parallel layout
(e.g. parallel.expert=2) and saves its LM logits on each text verification input (one
document, the packed row), by name; launched by torchrun from the converter tests."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True, help="converted checkpoint (with megavl_config.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    parser.add_argument("--out", required=True, help="where rank 0 saves {input name: logits} (torch.save)")
    return parser.parse_args()


def _reserved(folder: str) -> set:
    from megavl.convert.verify import reserved_token_ids

    reserved = set()
    for name in ("hf_config.json", "hf_vision_config.json"):
        with open(os.path.join(folder, name)) as f:
            reserved |= reserved_token_ids(json.load(f))
    return reserved


def main():
    args = parse_args()
    from megavl.config import load_config
    from megavl.convert.verify import megavl_logits
    from megavl.convert.verify_pairing import text_inputs
    from megavl.models.build import build_model
    from megavl.platform.distributed import init_distributed, shutdown
    from megavl.training.checkpoint import load_model_weights

    config = load_config(os.path.join(args.load, "megavl_config.yaml"), args.overrides)
    layout = init_distributed(config)
    model = build_model(config)
    load_model_weights(model, args.load)
    logits = {each.name: megavl_logits(model, config, each.batch(config))
              for each in text_inputs(config, _reserved(args.load))}
    if layout.rank == 0:
        torch.save(logits, args.out)
    shutdown()


if __name__ == "__main__":
    main()
