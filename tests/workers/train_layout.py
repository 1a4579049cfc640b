"""Trains the test model for a few steps under one parallel layout; launched by torchrun from tests.

Writes per-step losses and gradient norms (and optionally logits on a fixed
batch) as JSON from global rank 0, so tests can compare layouts.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--init", help="load initial weights from this checkpoint")
    parser.add_argument("--save-init", help="save the freshly initialised weights here")
    parser.add_argument("--save-final", help="save the weights after training here")
    parser.add_argument("--logits", action="store_true", help="record logits on a fixed batch")
    parser.add_argument("--text-only-odd", action="store_true",
                        help="odd global microbatches hold no image (at DP=2, all of DP rank 1's)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def fixed_batch_logits(config, model):
    """Logits of a fixed batch (eval mode, gathered over TP) through all pipeline stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megavl.data.random_samples import random_batches
    from megavl.platform.features import detect
    from megavl.models.inputs import attention_mask_for
    from megavl.models.inputs import to_device as model_inputs

    batch = random_batches(config, 1, seed=12345)[0]
    collected = []

    def forward_step(data_iterator, chunk):
        b = model_inputs(next(data_iterator), config, detect().device)
        mask = attention_mask_for(b, config.model.lm.image_attention == "bidirectional", "sdpa")
        out = chunk(b["tokens"], b["position_ids"], mask, pixel_values=b["pixel_values"],
                    image_grid_thw=b["image_grid_thw"], gather_logits=True)

        def keep(output):
            collected.append(output.detach().float())
            return output.sum(), {}

        return out, keep

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
            num_microbatches=1, seq_length=config.train.seq_length,
            micro_batch_size=config.train.micro_batch_size, forward_only=True,
        )
    model.train()
    logits = collected[0] if collected else None
    # Share the last stage's logits with global rank 0.
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shape = list(batch["tokens"].shape) + [config.model.lm.vocab_size]
        if logits is None:
            logits = torch.empty(shape)
        dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return logits


def main():
    args = parse_args()
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import init_distributed, set_seed, shutdown
    from megavl.training.checkpoint import load_model_weights, save_model_weights
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import num_microbatches, train_step

    config = load_config(args.config, args.overrides)
    layout = init_distributed(config)
    set_seed(config.train.seed)
    model = build_model(config)
    if args.save_init:
        save_model_weights(model, args.save_init)
    if args.init:
        load_model_weights(model, args.init)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)

    microbatches = num_microbatches(config, layout.data)
    per_step = microbatches * layout.data
    batches = random_batches(config, per_step * args.steps, seed=args.data_seed)
    if args.text_only_odd:
        text = random_batches(config, per_step * args.steps, seed=args.data_seed + 1, max_images=0)
        batches = [text[i] if i % 2 else batch for i, batch in enumerate(batches)]
    results = {"loss": [], "grad_norm": [], "answer_tokens": []}
    for step in range(args.steps):
        step_batches = batches[step * per_step : (step + 1) * per_step]
        # Global microbatch i goes to DP rank i % DP: the same global batch for every layout.
        mine = step_batches[layout.data_rank :: layout.data]
        result = train_step(config, chunks, optimizer, scheduler, iter(mine), microbatches)
        results["loss"].append(result.loss)
        results["grad_norm"].append(result.grad_norm)
        results["answer_tokens"].append(result.answer_tokens)
    if args.save_final:
        save_model_weights(model, args.save_final)
    if args.logits:
        logits = fixed_batch_logits(config, model)
        results["logits"] = logits.tolist() if layout.rank == 0 else None
    if layout.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown()


if __name__ == "__main__":
    main()
