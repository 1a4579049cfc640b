"""Platform detection and the CPU compatibility layer for megatron-core."""

from __future__ import annotations

import torch

from megavl.platform import cpu_compat, detect


def test_describe_names_the_chosen_back_ends():
    line = detect().describe()
    assert line.startswith("platform: ")
    for part in ("dist=", "layers=", "attention=", "transformer_engine="):
        assert part in line
    if not torch.cuda.is_available():
        assert "dist=gloo" in line and "attention=sdpa" in line and "layers=local" in line


def test_cuda_spellings_land_on_the_cpu():
    if torch.cuda.is_available():
        return
    assert cpu_compat.apply()
    assert cpu_compat.apply()  # idempotent
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"  # what megatron's optimizers check
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())


def test_model_parallel_rng_tracker_forks_the_cpu_generator(megatron_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.manual_seed(1)
    outside_before = torch.rand(1)
    torch.manual_seed(1)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    # The fork restored the default stream, so it continues as if the fork never happened.
    assert torch.equal(torch.rand(1), outside_before)
    with get_cuda_rng_tracker().fork():
        inside_again = torch.rand(4)
    assert not torch.equal(inside, inside_again)  # the tracked stream advanced
