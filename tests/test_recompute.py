"""Activation recompute (perf.recompute_lm, perf.recompute_vision) in one process: the same
gradients, fewer saved activations, and the forward's side records (router statistics, the
aux-loss log) made once. The layouts' equivalence is in test_parallel_equivalence.py."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT

MOE = str(ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml")
RECOMPUTE = ["perf.recompute_lm=full", "perf.recompute_vision=full"]


def _forward_backward(config_path, overrides, batches):
    """(per-parameter gradients, bytes autograd saved, router statistics, aux-loss log) of one
    forward and backward per batch, on a model initialised the same whatever the overrides."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megavl.config import load_config
    from megavl.models import inputs
    from megavl.models.build import build_model
    from megavl.models.moe import RouterStatistics
    from megavl.platform.features import detect

    config = load_config(config_path, ["parallel.expert=1", *overrides])
    torch.manual_seed(0)
    model = build_model(config)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    clear_aux_losses_tracker()
    RouterStatistics.start()
    try:
        for batch in batches:
            batch = inputs.to_device(batch, config, detect().device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = (inputs.forward(model, batch, config, detect()) * batch["loss_mask"]).sum()
            loss.backward()
    finally:
        # A backward outside megatron's schedule leaves the MoE aux-loss scale as megatron's
        # 0-d default, which the schedule's later [1]-shaped set_loss_scale cannot copy into.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    statistics = RouterStatistics.stop()
    logged = {name: entry["values"].clone() for name, entry in get_moe_layer_wise_logging_tracker().items()}
    clear_aux_losses_tracker()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, sum(saved), statistics, logged


@pytest.mark.parametrize("config_path", [str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), MOE],
                         ids=["dense", "moe"])
def test_recompute_gives_the_same_gradients_and_side_records_with_fewer_saved_activations(megatron_world,
                                                                                          config_path):
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches

    batches = random_batches(load_config(config_path, ["parallel.expert=1"]), 2, seed=4)
    kept = _forward_backward(config_path, [], batches)
    recomputed = _forward_backward(config_path, RECOMPUTE, batches)
    assert sorted(recomputed[0]) == sorted(kept[0])
    for name, grad in kept[0].items():
        assert torch.equal(recomputed[0][name], grad), name
    # The layers keep only their inputs (and the recompute's own saves happen in the backward).
    assert recomputed[1] < 0.5 * kept[1], (recomputed[1], kept[1])
    for layer, entry in kept[2].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(recomputed[2][layer][key]), torch.as_tensor(value)), (layer, key)
    assert sorted(recomputed[3]) == sorted(kept[3])
    for name, values in kept[3].items():
        assert torch.equal(recomputed[3][name], values), name


def test_recompute_lm_layers_recomputes_the_first_layers_of_each_stage(megatron_world):
    from megavl.config import load_config
    from megavl.models.build import build_model

    model = build_model(load_config(None, ["perf.recompute_lm=full", "perf.recompute_lm_layers=2"]))
    wrapped = ["forward" in vars(layer) for layer in model.language_model.decoder.layers]
    assert wrapped == [True, True] + [False] * (len(wrapped) - 2)
    assert not any("forward" in vars(layer) for layer in model.vision.layers)
