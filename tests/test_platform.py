"""Platform detection and the CPU compatibility layer for megatron-core."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from megavl.platform import cpu_compat, detect
from megavl.platform.features import Platform

from conftest import TINY_CONFIG

# The compatibility layer is applied only where torch has no CUDA.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="tests the CPU compatibility layer, which a CUDA machine does not apply")


def test_describe_names_the_chosen_back_ends():
    line = detect().describe()
    assert line.startswith("platform: ")
    for part in ("dist=", "layers=", "attention=", "transformer_engine="):
        assert part in line
    if not torch.cuda.is_available():
        assert "dist=gloo" in line and "attention=sdpa" in line and "layers=local" in line


@pytest.mark.parametrize("found, line", [
    (dict(cuda=False, device_count=0, transformer_engine=False, apex=False, dali=True, flex_attention=True),
     "device=cpu dist=gloo layers=local attention=sdpa transformer_engine=False apex=False dali=True"),
    (dict(cuda=True, device_count=8, transformer_engine=True, apex=True, dali=False, flex_attention=True),
     "device=cuda x8 dist=nccl layers=te attention=flex transformer_engine=True apex=True dali=False"),
    (dict(cuda=True, device_count=2, transformer_engine=False, apex=False, dali=True, flex_attention=False),
     "device=cuda x2 dist=nccl layers=local attention=sdpa transformer_engine=False apex=False dali=True"),
], ids=["cpu", "cuda-te-flex", "cuda-no-te-no-flex"])
def test_back_ends_follow_what_was_found(found, line):
    # FlexAttention only with CUDA (its backward needs a GPU), TE layers only with TE.
    assert Platform(**found).describe() == f"platform: {line} torch={torch.__version__}"


def test_detect_reports_this_process():
    platform = detect()
    assert platform.cuda == torch.cuda.is_available()
    assert platform.device_count == (torch.cuda.device_count() if platform.cuda else 0)
    assert platform.device.type == ("cuda" if platform.cuda else "cpu")
    assert not platform.transformer_engine or platform.cuda  # TE is only used with CUDA


@cpu_only
def test_cuda_spellings_land_on_the_cpu():
    assert cpu_compat.apply()
    assert cpu_compat.apply()  # idempotent
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.FloatTensor"  # only megatron's own type checks see a CUDA name
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


@cpu_only
def test_megatron_type_checks_accept_cpu_tensors_there_only():
    cpu_compat.apply()
    from megatron.core.optimizer import clip_grads, optimizer

    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    # Asserts that the gradient's type() is 'torch.cuda.FloatTensor'; a norm
    # below max_norm leaves the gradient as it is.
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=0.5)
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    assert torch.equal(param.grad, torch.ones(3)) and param.grad.type() == "torch.FloatTensor"


def test_a_missing_patch_target_fails_naming_it():
    target = types.ModuleType("megatron.core.renamed")
    with pytest.raises(RuntimeError, match=r"megatron\.core\.renamed has no attribute '_old_name'"):
        cpu_compat._replace(target, "_old_name", None)


def test_only_megatrons_missing_backend_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import megavl.platform.megatron_warnings as quiet

        quiet.silence_missing_backend_warnings()
        for message in ("Apex is not installed. Falling back to Torch Norm", "something else"):
            warnings.warn_explicit(message, UserWarning, "backends.py", 1, module="megatron.core.models.backends")
        warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning, "x.py", 1,
                               module="someone.else")
    assert [str(w.message) for w in caught] == ["something else", "Apex is not installed. Falling back to Torch Norm"]


def test_collective_tensors_live_where_the_back_end_moves_memory(megatron_world, monkeypatch):
    import torch
    import torch.distributed as dist

    from megavl.platform.distributed import collective_device

    assert collective_device() == torch.device("cpu")  # gloo
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)


def test_layer_backend_auto_picks_transformer_engine_only_where_it_can_build_the_model():
    from megavl.config import load_config
    from megavl.platform.features import Platform, layer_backend_for

    with_te = Platform(cuda=True, device_count=8, transformer_engine=True, apex=True, dali=True, flex_attention=True)
    without_te = Platform(cuda=False, device_count=0, transformer_engine=False, apex=False, dali=False,
                          flex_attention=True)
    lora = load_config(str(TINY_CONFIG))
    no_lora = load_config(str(TINY_CONFIG), ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"])
    assert layer_backend_for(no_lora, with_te)[0] == "te"
    backend, why = layer_backend_for(lora, with_te)
    assert backend == "local" and "vision LoRA" in why and "mlp_rank" in why
    assert layer_backend_for(no_lora, without_te) == (
        "local", "model.layer_backend = auto and Transformer Engine is not installed")
    forced = load_config(str(TINY_CONFIG), ["model.layer_backend=local"])
    assert layer_backend_for(forced, with_te) == ("local", "model.layer_backend = local")


def test_layer_backend_te_is_refused_before_start_up_with_the_reason():
    from megavl.config import ConfigError, load_config, validate
    from megavl.platform.features import detect

    config = load_config(str(TINY_CONFIG), ["model.layer_backend=te"])
    with pytest.raises(ConfigError) as error:
        validate(config, world_size=1)
    text = str(error.value)
    assert "model.layer_backend = te: vision LoRA (model.lm.vision_lora.mlp_rank = " in text
    if not detect().transformer_engine:
        assert "model.layer_backend = te: Transformer Engine is not installed in this environment" in text
