"""Checkpoint commit protocol (in one process): a crash mid-save leaves the previous checkpoint loadable."""

from __future__ import annotations

import errno
import os

import pytest
import torch


@pytest.fixture()
def trainable(megatron_world):
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training.optimizer import build_optimizer, build_scheduler

    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    config = megatron_world
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    # One real step so the optimizer has state to save.
    microbatches = num_microbatches(config, 1)
    train_step(config, chunks, optimizer, scheduler, iter(random_batches(config, microbatches, seed=1)), microbatches)
    return config, model, optimizer, scheduler


def test_crash_during_save_keeps_previous_checkpoint(trainable, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megavl.training import checkpoint as ckpt

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}

    def crash(state, folder, *args, **kwargs):
        with open(os.path.join(folder, "half_written.distcp"), "w") as f:
            f.write("partial")
        raise RuntimeError("node lost power")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(RuntimeError, match="power"):
        ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), {"pos": 2})
    monkeypatch.undo()

    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000001"
    assert not os.path.exists(ckpt.iteration_dir(root, 2))
    state = ckpt.load_checkpoint(root, model, optimizer, scheduler)
    assert state.step == 1
    for key, value in model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def _assert_loads_step(root, trainable, step):
    from megavl.training import checkpoint as ckpt

    _, model, optimizer, scheduler = trainable
    assert ckpt.load_checkpoint(root, model, optimizer, scheduler).step == step


@pytest.mark.parametrize("failure", [
    pytest.param(lambda: OSError(errno.ENOSPC, "No space left on device"), id="disk-full"),
    pytest.param(lambda: OSError(errno.EIO, "Input/output error"), id="io-error"),
])
@pytest.mark.parametrize("where", ["writing", "publishing"])
def test_failed_save_names_folder_and_reason_and_keeps_the_previous_checkpoint(trainable, tmp_path, monkeypatch,
                                                                                failure, where):
    from megatron.core import dist_checkpointing

    from megavl.training import checkpoint as ckpt
    from megavl.training import checkpoint_files

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})
    error = failure()
    if where == "writing":
        def fail(state, folder, *args, **kwargs):
            with open(os.path.join(folder, "half_written.distcp"), "w") as f:
                f.write("partial")
            raise error
        monkeypatch.setattr(dist_checkpointing, "save", fail)
    else:
        real_replace = os.replace

        def fail(source, target):
            if target.endswith("iter_0000002" + checkpoint_files.SAVED):
                raise error
            real_replace(source, target)
        monkeypatch.setattr(checkpoint_files.os, "replace", fail)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), {"pos": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert os.path.join(root, "iter_0000002.partial") in message
    assert error.strerror in message and "previous checkpoint is still the latest" in message
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000001"
    assert not os.path.exists(ckpt.iteration_dir(root, 2))
    _assert_loads_step(root, trainable, 1)


def test_saving_a_step_again_never_leaves_latest_without_a_checkpoint(trainable, tmp_path, monkeypatch):
    import shutil

    from megavl.training import checkpoint as ckpt
    from megavl.training import checkpoint_files

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest"]
    _assert_loads_step(root, trainable, 1)

    # A crash while the old folder of the step is being removed: latest names the new, complete save.
    real_rmtree = shutil.rmtree

    def crash(path, *args, **kwargs):
        if path == ckpt.iteration_dir(root, 1):
            raise KeyboardInterrupt("killed while removing the old folder")
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint_files.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_files.publish(root, _complete_copy(root), ckpt.iteration_dir(root, 1))
    monkeypatch.undo()
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000001.saved"
    _assert_loads_step(root, trainable, 1)
    assert checkpoint_files.remove_incomplete(root) == []  # the folder latest names stays

    # A crash after the last rename, before latest follows it: latest's folder is found under its final name.
    shutil.rmtree(ckpt.iteration_dir(root, 1))
    os.replace(ckpt.iteration_dir(root, 1) + checkpoint_files.SAVED, ckpt.iteration_dir(root, 1))
    assert ckpt.latest_checkpoint(root) == ckpt.iteration_dir(root, 1)
    _assert_loads_step(root, trainable, 1)


def _complete_copy(root):
    """A complete save of step 1 under a .partial name, as save_checkpoint leaves it before publishing."""
    import shutil

    copy = os.path.join(root, "iter_0000001.partial")
    shutil.copytree(os.path.join(root, "iter_0000001"), copy)
    return copy


def test_missing_checkpoint_is_a_clear_error(trainable, tmp_path):
    from megavl.training.checkpoint import load_checkpoint

    _, model, optimizer, scheduler = trainable
    with pytest.raises(FileNotFoundError, match="checkpoint.load"):
        load_checkpoint(str(tmp_path), model, optimizer, scheduler)


@pytest.mark.parametrize("config_name,overrides", [
    ("tiny_cpu.yaml", []),
    ("tiny_cpu.yaml", ["model.vision.kind=qwen2_vl", "model.vision.norm=layernorm", "model.vision.mlp=gelu_quick",
                       "model.lm.tie_embeddings=false"]),
    ("tiny_siglip_cpu.yaml", ["model.adapter.norm=before"]),
    ("tiny_clip_cpu.yaml", ["model.vision.post_norm=true", "model.adapter.bias=false"]),
    ("tiny_moe_cpu.yaml", ["parallel.expert=1", "model.lm.moe.shared_expert_ffn_hidden_size=96"]),
    ("tiny_roaya_cpu.yaml", []),
    # Heads of 48 on a width of 128 (Qwen3's layout), with q/k norms and multimodal RoPE over 24 pairs.
    ("tiny_cpu.yaml", ["model.lm.head_dim=48", "model.lm.qk_layernorm=true", "model.lm.mrope_section=[8,8,8]"]),
])
def test_parameter_counts_from_config_match_the_built_model(megatron_world, config_name, overrides):
    from megavl.config import load_config
    from megavl.models.build import build_model
    from megavl.models.param_count import total_parameter_counts as parameter_counts

    from conftest import ROOT

    config = load_config(str(ROOT / "examples" / "configs" / config_name), overrides)
    model = build_model(config)
    predicted = parameter_counts(config)
    for name, count in predicted.items():
        actual = sum(p.numel() for p in getattr(model, name).parameters())
        assert actual == count, f"{name}: built {actual}, formula {count}"


def test_pretrained_weights_without_adapters_start_them_fresh(megatron_world, tmp_path):
    """A converted (adapter-free) checkpoint loads into a model with vision LoRA; outputs are unchanged."""
    import random

    from megavl.config import load_config
    from megavl.data.batch import collate_rows, pack_row
    from megavl.data.random_samples import random_sample
    from megavl.models.build import build_model
    from megavl.training.checkpoint import load_model_weights, save_model_weights
    from megavl.models.inputs import attention_mask_for
    from megavl.models.inputs import to_device as model_inputs

    from conftest import ROOT

    base = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
    plain_config = load_config(str(base), ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0",
                                            "train.seed=99"])
    plain = build_model(plain_config)
    save_model_weights(plain, str(tmp_path / "converted"))

    with_lora = build_model(load_config(str(base)))
    fresh = load_model_weights(with_lora, str(tmp_path / "converted"), allow_fresh_adapters=True)
    assert fresh and all(name.endswith(("lora_a", "lora_b")) for name in fresh)

    rng = random.Random(2)
    sample = random_sample(rng, plain_config, max_images=1)
    batch = model_inputs(collate_rows([pack_row([sample], 512, 3, 2)]), plain_config, torch.device("cpu"))
    mask = attention_mask_for(batch, True, "sdpa")
    with torch.no_grad():
        outputs = [m(batch["tokens"], batch["position_ids"], mask, pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"], gather_logits=True) for m in (plain, with_lora)]
    assert torch.equal(outputs[0], outputs[1])

    with pytest.raises(ValueError, match="lora_b"):
        load_model_weights(with_lora, str(tmp_path / "converted"))  # strict without the allowance


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_background_save_writes_the_weights_of_its_step_and_moves_latest_only_when_done(trainable, tmp_path):
    """checkpoint.async_save: a helper process writes what the step staged, even though
    training changes the weights meanwhile; latest moves when poll() finds the write done."""
    from megavl.training import checkpoint as ckpt

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})
    background = ckpt.BackgroundSaves()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    staged = _weights(model)
    folder = ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), {"pos": 2},
                                  background=background)
    assert background.pending == 1
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000001"
    with torch.no_grad():  # the next steps train on while the save is written
        for p in model.parameters():
            p.add_(1.0)
    assert background.poll(wait=True) == [folder]
    assert background.pending == 0
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000002"
    assert not os.path.exists(folder + ".partial")
    assert ckpt.load_checkpoint(root, model, optimizer, scheduler).step == 2
    for key, value in model.state_dict().items():
        if key in staged:
            torch.testing.assert_close(value, staged[key], rtol=0, atol=0)


@pytest.mark.parametrize("in_background", [False, True], ids=["sync", "background"])
def test_failed_tensor_write_is_reported_and_keeps_the_previous_checkpoint(trainable, tmp_path, monkeypatch,
                                                                           in_background):
    """The writer's own failure (raised by torch as a CheckpointException, a BaseException)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megavl.training import checkpoint as ckpt

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"pos": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The writer processes are forked, so they write each tensor with the patched function.
    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    background = ckpt.BackgroundSaves() if in_background else None
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), {"pos": 2},
                             background=background)
        if in_background:
            background.poll(wait=True)
    monkeypatch.undo()
    message = str(info.value)
    assert os.path.join(root, "iter_0000002.partial") in message
    assert "No space left on device" in message and "previous checkpoint is still the latest" in message
    assert background is None or background.pending == 0
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000001"
    assert not os.path.exists(ckpt.iteration_dir(root, 2))
    _assert_loads_step(root, trainable, 1)


def test_resume_restores_the_random_generators_and_the_loader_position(trainable, tmp_path):
    """What a resumed run draws next (torch, Python, NumPy) is what the saving run drew next,
    and the loader is handed the position saved with the weights."""
    import random

    import numpy as np

    from megavl.training import checkpoint as ckpt

    config, model, optimizer, scheduler = trainable
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=1), {"position": 17})
    after_save = (torch.rand(4), random.random(), np.random.rand())
    for _ in range(3):  # the run goes on drawing
        torch.rand(100), random.random(), np.random.rand()

    class Loader:
        restored = None

        def load_state_dict(self, state):
            self.restored = state

    loader = Loader()
    assert ckpt.load_checkpoint(root, model, optimizer, scheduler, loader).step == 1
    assert loader.restored == {"position": 17}
    resumed = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(resumed[0], after_save[0]) and resumed[1:] == after_save[1:]


def _carry_extra_state(model, value: int) -> list[str]:
    """Gives the model's norms and tensor-parallel linears a ``_extra_state`` the way Transformer
    Engine 2.x modules have one: a uint8 tensor of serialised FP8 metadata from get_extra_state,
    and a set_extra_state that ignores None or an empty tensor (what megatron-core's local linears
    save). Megatron's own sharded state dict then makes each a ShardedObject, as it does for TE's
    modules. Returns the state-dict names of the extra states."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megavl.models.norm import RMSNorm

    def get_extra_state(self):
        return self.fp8_meta.clone()

    def set_extra_state(self, state):
        if state is None or state.numel() == 0:
            return
        self.fp8_meta = state.clone()
        self.extra_state_loads += 1

    names = []
    for name, module in model.named_modules():
        # The output layer is megatron-core's own linear on the TE path too.
        kinds = (ColumnParallelLinear, RowParallelLinear, RMSNorm)
        if not isinstance(module, kinds) or name.endswith("output_layer"):
            continue
        base = type(module)
        module.__class__ = type(f"{base.__name__}WithExtraState", (base,),
                                {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state})
        module.fp8_meta = torch.full((8,), value, dtype=torch.uint8)
        module.extra_state_loads = 0
        names.append(f"{name}._extra_state")
    return names


def _assert_same_weights(model, reference) -> None:
    ours = {k: v for k, v in _weights(model).items() if not k.endswith("_extra_state")}
    theirs = {k: v for k, v in _weights(reference).items() if not k.endswith("_extra_state")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoints_without_and_with_extra_state_load_into_each_other(trainable, tmp_path):
    """A checkpoint of local layers (no ``_extra_state``) loads into a model whose linears carry one,
    as TE's do: the weights arrive and the extra state keeps its initial value. The other way, a local
    model ignores the saved extra state, and a model with extra state gets it back. Training
    resumes (optimizer included) across the two."""
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training import checkpoint as ckpt
    from megavl.training.optimizer import build_optimizer, build_scheduler

    config, local, optimizer, scheduler = trainable
    ckpt.save_model_weights(local, str(tmp_path / "local"))

    carrying = build_model(config)
    names = _carry_extra_state(carrying, 7)
    assert names and all(name in carrying.sharded_state_dict() for name in names)
    assert ckpt.load_model_weights(carrying, str(tmp_path / "local")) == []
    _assert_same_weights(carrying, local)
    linears = [m for m in carrying.modules() if hasattr(m, "extra_state_loads")]
    assert all(m.extra_state_loads == 0 and int(m.fp8_meta[0]) == 7 for m in linears)

    for module in linears:
        module.fp8_meta.fill_(42)
    ckpt.save_model_weights(carrying, str(tmp_path / "carrying"))
    fresh_local = build_model(config)
    ckpt.load_model_weights(fresh_local, str(tmp_path / "carrying"))
    _assert_same_weights(fresh_local, local)
    again = build_model(config)
    _carry_extra_state(again, 0)
    ckpt.load_model_weights(again, str(tmp_path / "carrying"))
    assert all(m.extra_state_loads == 1 and int(m.fp8_meta[0]) == 42
               for m in again.modules() if hasattr(m, "extra_state_loads"))

    # The resume path: a local run's full checkpoint into the carrying model and its optimizer.
    ckpt.save_checkpoint(str(tmp_path / "run"), config, local, optimizer, scheduler, ckpt.TrainState(step=3), None)
    resumed = build_model(config)
    _carry_extra_state(resumed, 5)
    resumed_chunks = wrap_for_training(config, resumed)
    resumed_optimizer = build_optimizer(config, resumed_chunks)
    state = ckpt.load_checkpoint(str(tmp_path / "run"), resumed, resumed_optimizer,
                                 build_scheduler(config, resumed_optimizer))
    assert state.step == 3
    _assert_same_weights(resumed, local)


def _trainer_with(config, overrides):
    from megavl.config import config_from_dict, config_to_dict
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training.optimizer import build_optimizer, build_scheduler

    d = config_to_dict(config)
    for key, value in overrides.items():
        section, field = key.split(".")
        d[section][field] = value
    config = config_from_dict(d)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    return config, model, optimizer, build_scheduler(config, optimizer)


def test_optimizer_state_in_other_gradient_buckets_starts_fresh_and_says_why(megatron_world, tmp_path, caplog):
    """The distributed optimizer's state is saved bucket by bucket, so a checkpoint of one bucket
    layout (perf.overlap_grad_reduce, perf.bucket_size) cannot fill another's: the weights load,
    the optimizer starts fresh with a warning naming the settings; the same buckets restore it."""
    from megavl.training import checkpoint as ckpt
    from megavl.training.optimizer import gradient_buckets, optimizer_form

    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    small = {"perf.overlap_grad_reduce": True, "perf.bucket_size": 20000}
    config, model, optimizer, scheduler = _trainer_with(megatron_world, small)
    assert len(gradient_buckets(optimizer)[0]) > 1
    chunks = optimizer.model_chunks
    microbatches = num_microbatches(config, 1)
    train_step(config, chunks, optimizer, scheduler, iter(random_batches(config, microbatches, seed=1)), microbatches)
    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=5), None)

    for overrides, restored in ((small, True), ({}, False)):
        config2, model2, optimizer2, scheduler2 = _trainer_with(megatron_world, overrides)
        caplog.clear()
        with caplog.at_level("WARNING"):
            ckpt.load_checkpoint(root, model2, optimizer2, scheduler2, form=optimizer_form(config2, 1, optimizer2))
        assert ("saved in other gradient buckets" in caplog.text) == (not restored), caplog.text
        if not restored:
            assert "perf.overlap_grad_reduce and perf.bucket_size" in caplog.text
