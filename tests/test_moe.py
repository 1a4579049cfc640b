"""Mixture-of-experts LM: expert parallelism and other layouts train like one process; checkpoints reshard."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, read_json, run_torchrun

MOE_CONFIG = ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml"
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.seq_length=256", "parallel.expert=1"]
SHARED = ["model.lm.moe.shared_expert_ffn_hidden_size=96"]
NO_LORA = ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"]
# train.parts: a frozen vision tower, router and embeddings, the adapter at twice the learning rate.
FROZEN = ["train.parts.vision.train=false", "train.parts.router.train=false",
          "train.parts.lm_embeddings.train=false", "train.parts.output_layer.train=false",
          "train.parts.adapter.lr_mult=2"]
# The alignment stage: only the adapter trains, so pipeline stage 1 holds nothing that trains
# and must still pass the gradient back to stage 0.
ADAPTER_ONLY = [f"train.parts.{part}.train=false" for part in
                ("vision", "lm", "lm_embeddings", "output_layer", "vision_lora", "router")]
LAYOUTS = {
    "EP2-alltoall": (["parallel.expert=2"], []),
    "EP2-allgather": (["parallel.expert=2", "model.lm.moe.dispatcher=allgather"], []),
    "PP2": (["parallel.pipeline=2"], []),
    "EP2-frozen": (["parallel.expert=2"], FROZEN),
    "PP2-frozen": (["parallel.pipeline=2"], FROZEN),
    "TP2-SP-frozen": (["parallel.tensor=2", "parallel.sequence_parallel=true"], FROZEN),
    "PP2-adapter-only": (["parallel.pipeline=2"], ADAPTER_ONLY),
    "EP2-shared-expert": (["parallel.expert=2"], SHARED),
    # Without EP every TP rank holds whole experts (expert_tensor = 1) that compute only its
    # slice of the sequence: their gradients must be summed over the TP ranks.
    "TP2-SP": (["parallel.tensor=2", "parallel.sequence_parallel=true"], []),
    "TP2-SP-no-lora": (["parallel.tensor=2", "parallel.sequence_parallel=true"], NO_LORA),
    # With sequence parallelism each TP rank routes half the sequence: the router's
    # load-balancing and z losses must still add up to one process's.
    "TP2-SP-EP2": (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"], []),
    "TP2-SP-EP2-allgather": (
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2",
         "model.lm.moe.dispatcher=allgather"], []),
    # Every LM and vision layer recomputed in the backward, experts and vision LoRA included.
    "TP2-SP-EP2-recompute": (
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2",
         "perf.recompute_lm=full", "perf.recompute_vision=full"], []),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe")
    results = {}
    for index, extra in enumerate(([], SHARED, NO_LORA, FROZEN, ADAPTER_ONLY)):
        out = work / f"single-{index}.json"
        run_torchrun(1, "train_layout.py", ["--config", str(MOE_CONFIG), "--set", *COMMON, *extra, "--out", str(out)])
        results[tuple(extra)] = read_json(out)
    return work, results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_single_process(references, name):
    work, single = references
    layout, extra = LAYOUTS[name]
    reference = single[tuple(extra)]
    out = work / f"{name}.json"
    run_torchrun(2, "train_layout.py", ["--config", str(MOE_CONFIG), "--set", *COMMON, *extra, *layout, "--out", str(out)])
    result = read_json(out)
    assert result["answer_tokens"] == reference["answer_tokens"]
    # Losses to 1e-5. Gradient norms sum many more fp32 terms, in a different order
    # under TP, and drift by up to ~1e-5 over three steps; 1e-4 still catches a
    # missing or doubled gradient, which moves the norm by percents.
    tolerances = {"loss": 1e-5, "grad_norm": 1e-4 if "TP" in name else 1e-5}
    for key, rel in tolerances.items():
        for step, (got, want) in enumerate(zip(result[key], reference[key])):
            assert got == pytest.approx(want, rel=rel), f"{name} {key} at step {step}: {got} vs {want}"


@pytest.mark.slow
def test_ep2_checkpoint_reloads_at_ep1(tmp_path):
    run_torchrun(2, "train_layout.py", [
        "--config", str(MOE_CONFIG), "--set", *COMMON, "parallel.expert=2", "train.global_batch_size=2",
        "--steps", "2", "--save-final", str(tmp_path / "ckpt"), "--logits", "--out", str(tmp_path / "ep2.json"),
    ])
    run_torchrun(1, "train_layout.py", [
        "--config", str(MOE_CONFIG), "--set", *COMMON, "train.global_batch_size=2",
        "--steps", "0", "--init", str(tmp_path / "ckpt"), "--logits", "--out", str(tmp_path / "ep1.json"),
    ])
    ep2 = torch.tensor(read_json(tmp_path / "ep2.json")["logits"])
    ep1 = torch.tensor(read_json(tmp_path / "ep1.json")["logits"])
    torch.testing.assert_close(ep1, ep2, atol=1e-5, rtol=0)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor methods that copy to the host (a device sync on a GPU), by the line calling them."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"}

    def __init__(self):
        super().__init__()
        self.by_file: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            import traceback

            frame = traceback.extract_stack(limit=2)[0]
            caller = f"{frame.filename}:{frame.lineno}"
            self.by_file[caller] = self.by_file.get(caller, 0) + 1
        return func(*args, **(kwargs or {}))


def test_router_statistics_stay_on_the_device_and_are_gathered_only_on_logging_steps(megatron_world):
    """Recording the expert load and entropy reads nothing back to the host in any MoE layer; a logging
    step reads the step's totals once; a step that does not log records nothing and leaves no router
    losses behind for the next one."""
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.models.moe import RouterStatistics
    from megavl.training.moe_metrics import router_statistics
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import num_microbatches, train_step

    config = load_config(str(MOE_CONFIG), COMMON)
    chunks = wrap_for_training(config, build_model(config))
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    microbatches = num_microbatches(config, 1)
    batches = random_batches(config, microbatches, seed=4)
    calls, reads = [], _HostReads()
    original = RouterStatistics.record

    def counted(cls, *args):
        calls.append(args[0])
        with reads:
            original.__func__(cls, *args)

    RouterStatistics.record = classmethod(counted)
    try:
        with router_statistics(config, microbatches, collect=False) as quiet:
            train_step(config, chunks, optimizer, scheduler, iter(batches), microbatches)
        assert quiet.stats is None and calls == []
        with router_statistics(config, microbatches) as logged:
            train_step(config, chunks, optimizer, scheduler, iter(batches), microbatches)
    finally:
        RouterStatistics.record = original
    assert len(calls) == 3 * microbatches  # three MoE layers
    assert reads.by_file == {}
    real_tokens = sum(int(b["tokens"].numel()) for b in batches)
    assert logged.stats["routed_tokens"] == {"2": real_tokens, "3": real_tokens, "4": real_tokens}
    for layer in ("2", "3", "4"):
        load = logged.stats["expert_load"][layer]
        assert sum(load["text"]) + sum(load["vision"]) == 2 * real_tokens  # top-2
        assert sum(load["vision"]) == 2 * sum(int((b["image_ids"] >= 0).sum()) for b in batches)
    # Only this step's router losses: the quiet step's were cleared.
    one_step = logged.stats["router_losses"]["load_balancing_loss"]
    with router_statistics(config, microbatches) as again:
        train_step(config, chunks, optimizer, scheduler, iter(batches), microbatches)
    assert again.stats["router_losses"]["load_balancing_loss"] == pytest.approx(one_step, rel=0.2)
