"""What the model must do with a microbatch, checked on the built model itself (one process):

* packed documents never see each other: a document's logits are the same alone, after another
  document, between two, and with trailing padding; with conversation masking a QA turn does not
  see the other turns either;
* the training step's gradient is the definition's: the sum of answer-token losses over all
  microbatches of the step divided by their count (not a mean of per-microbatch means).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ROOT


def _logits(model, config, samples, seq_length):
    from megavl.data.batch import collate_rows, pack_row
    from megavl.models import inputs
    from megavl.platform.features import detect

    platform = detect()
    row = pack_row(samples, seq_length, config.model.lm.image_token_id, config.model.vision.spatial_merge_size)
    batch = inputs.to_device(collate_rows([row]), config, platform.device)
    with torch.no_grad():
        return inputs.forward(model, batch, config, platform, with_labels=False, gather_logits=True)[0]


@pytest.fixture(scope="module")
def tiny_model(megatron_world):
    from megavl.models.build import build_model

    model = build_model(megatron_world)
    model.eval()
    return megatron_world, model


def test_a_packed_documents_logits_do_not_depend_on_its_neighbours(tiny_model):
    from megavl.data.random_samples import random_sample

    config, model = tiny_model
    rng = random.Random(5)
    # Documents with images, so bidirectional image spans sit next to each other when packed.
    a, b, c = [s for s in (random_sample(rng, config, max_images=2) for _ in range(40)) if s.images][:3]
    n = len(a)
    alone = _logits(model, config, [a], n)
    arrangements = {
        "padded": _logits(model, config, [a], n + 37)[:n],
        "after another": _logits(model, config, [b, a], len(b) + n)[len(b):],
        "between two": _logits(model, config, [b, a, c], len(b) + n + len(c))[len(b):len(b) + n],
        "between two, padded": _logits(model, config, [b, a, c], len(b) + n + len(c) + 11)[len(b):len(b) + n],
    }
    for name, logits in arrangements.items():
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5, msg=f"document A {name}")
    # The neighbours do reach the model: B's own logits differ from A's.
    assert not torch.allclose(_logits(model, config, [b], len(b))[:4], alone[:4], atol=1e-3)


def _changed_turn(sample, turn, token_id):
    """A copy of sample whose tokens of QA turn `turn` (outside image spans) are replaced."""
    from megavl.data.batch import Sample

    tokens = [token_id if t == turn else tok for tok, t in zip(sample.tokens, sample.turn_ids)]
    return Sample(tokens=tokens, labels=list(sample.labels), turn_ids=list(sample.turn_ids),
                  images=sample.images, key=sample.key)


def test_with_conversation_masking_a_turn_does_not_see_the_other_turns(tiny_model):
    from megavl.data.random_samples import random_sample

    config, model = tiny_model
    rng = random.Random(11)
    sample = next(s for s in (random_sample(rng, config, max_images=1, conversation_masking=True) for _ in range(50))
                  if max(s.turn_ids) >= 2)
    second = [i for i, t in enumerate(sample.turn_ids) if t == 2]
    edited = _changed_turn(sample, 1, token_id=config.model.lm.vocab_size - 1)
    n = len(sample)
    torch.testing.assert_close(_logits(model, config, [edited], n)[second], _logits(model, config, [sample], n)[second],
                               rtol=1e-5, atol=1e-5)
    # Without conversation masking the same edit is seen by turn 2: the check above is not vacuous.
    unmasked = [type(sample)(tokens=s.tokens, labels=s.labels, turn_ids=[0] * n, images=s.images)
                for s in (sample, edited)]
    before, after = (_logits(model, config, [s], n)[second] for s in unmasked)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("config_name, overrides", [
    ("tiny_cpu.yaml", []),
    # Router losses are off: the definition under test is the answer-token loss alone.
    ("tiny_moe_cpu.yaml", ["parallel.expert=1", "model.lm.moe.aux_loss_coeff=0", "model.lm.moe.z_loss_coeff=0"]),
], ids=["dense", "moe"])
def test_the_step_gradient_is_the_mean_over_all_answer_tokens_of_the_step(megatron_world, config_name, overrides):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models import inputs
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.features import detect
    from megavl.training.step import make_forward_step

    config = load_config(str(ROOT / "examples" / "configs" / config_name), overrides)
    microbatches = 3
    batches = random_batches(config, microbatches, seed=21)
    counts = [int(b["loss_mask"].sum()) for b in batches]
    assert len(set(counts)) == microbatches, f"answer tokens per microbatch should differ: {counts}"

    # megavl's step: megatron's schedule with calculate_per_token_loss, gradients in DDP's buffers.
    (chunk,) = wrap_for_training(config, build_model(config))
    chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=make_forward_step(config), data_iterator=iter(batches), model=[chunk],
        num_microbatches=microbatches, seq_length=config.train.seq_length,
        micro_batch_size=config.train.micro_batch_size, forward_only=False,
    )
    step = {name: p.main_grad.detach().clone() for name, p in chunk.module.named_parameters() if p.requires_grad}

    # The definition, with plain autograd on an identically initialised model.
    platform = detect()

    def gradients(normalise):
        reference = build_model(config)
        losses = []
        for batch in batches:
            moved = inputs.to_device(batch, config, platform.device)
            per_token = inputs.forward(reference, moved, config, platform)
            losses.append((per_token.float() * moved["loss_mask"]).sum())
        normalise(losses).backward()
        return {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}

    definition = gradients(lambda losses: sum(losses) / sum(counts))
    assert sorted(step) == sorted(definition)
    for name in step:
        torch.testing.assert_close(step[name], definition[name], rtol=1e-4, atol=1e-7, msg=name)

    # A per-microbatch mean would be a different gradient: the comparison above can tell them apart.
    per_microbatch = gradients(lambda losses: sum(l / c for l, c in zip(losses, counts)) / microbatches)
    assert max((step[n] - per_microbatch[n]).abs().max() for n in step) > 1e-4


def test_to_device_moves_everything_but_the_image_grids(megatron_world):
    """The microbatch goes to the training device, except image_grid_thw: the vision tower reads it on the
    host (patch coordinates, windows, position tables), so a copy would cost a sync back for each use.
    The meta device stands for a GPU here."""
    from megavl.data.random_samples import random_batches
    from megavl.models.inputs import to_device

    batch = random_batches(megatron_world, 1, seed=3)[0]
    assert batch["image_grid_thw"] is not None
    moved = to_device(batch, megatron_world, torch.device("meta"))
    assert moved["image_grid_thw"].device.type == "cpu"
    others = {name: value.device.type for name, value in moved.items()
              if torch.is_tensor(value) and name != "image_grid_thw"}
    assert others and set(others.values()) == {"meta"}, others


TOWER_CONFIGS = ["tiny_cpu.yaml", "tiny_moe_cpu.yaml", "tiny_siglip_cpu.yaml", "tiny_clip_cpu.yaml",
                 "tiny_roaya_cpu.yaml", "tiny_smolvlm_cpu.yaml"]


@pytest.mark.parametrize("config_name", TOWER_CONFIGS)
@pytest.mark.parametrize("max_images", [2, 0], ids=["with-images", "text-only"])
def test_every_trained_parameter_gets_a_gradient_read_in_its_own_modules_forward(megatron_world, config_name,
                                                                                 max_images):
    """What megatron's overlapped reduce and gather (perf.overlap_*) rely on, for every tower and
    microbatches with and without images: each trainable parameter gets a gradient in every
    microbatch (a bucket is reduced once all of its gradients are in), and it is read inside the
    forward of the module that holds it (that module's forward pre-hook gathers its new values)."""
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models import inputs
    from megavl.models.build import build_model
    from megavl.platform.features import detect

    config = load_config(str(ROOT / "examples" / "configs" / config_name), ["parallel.expert=1"])
    model = build_model(config)
    called = set()
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, *_: called.add(id(module)))
    batch = inputs.to_device(random_batches(config, 1, seed=5, max_images=max_images)[0], config, detect().device)
    assert (batch["pixel_values"] is None) == (max_images == 0)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    try:
        inputs.forward(model, batch, config, detect()).sum().backward()
    finally:
        # A backward outside megatron's schedule leaves the MoE aux-loss scale 0-d (see test_flops).
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    owners = {name: module for name, module in model.named_modules()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name} gets no gradient"
        owner = owners[name.rpartition(".")[0]]
        assert id(owner) in called, f"{name} is read outside the forward of {type(owner).__name__}"
