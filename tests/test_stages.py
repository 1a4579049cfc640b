"""train.stage presets and stage chaining: a preset's settings are defaults every config value
overrides; a stage started from the previous one's checkpoint records the chain."""

from __future__ import annotations

import pytest

from conftest import TINY_CONFIG
from trainer_runs import _metrics, _overrides, _train, data_dir  # noqa: F401  (data_dir is a fixture)


def test_the_align_preset_trains_only_the_adapter_on_all_text(tmp_path):
    from megavl.config import load_config

    config = load_config(str(TINY_CONFIG), ["train.stage=align"])
    parts = config.train.parts
    assert [name for name in ("vision", "adapter", "lm", "lm_embeddings", "output_layer", "vision_lora", "router")
            if getattr(parts, name).train] == ["adapter"]
    assert config.train.loss_scope == "all_text" and not config.model.lm.vision_lora.enabled
    for stage in ("pretrain", "sft"):
        config = load_config(str(TINY_CONFIG), [f"train.stage={stage}"])
        assert config.train.loss_scope == "answers" and config.train.parts.lm.train


def test_config_values_override_the_preset(tmp_path):
    from megavl.config import load_config

    path = tmp_path / "stage.yaml"
    path.write_text("train:\n  stage: align\n  parts:\n    lm:\n      train: true\n      lr_mult: 0.1\n")
    config = load_config(str(path), ["train.loss_scope=answers"])
    assert config.train.parts.lm.train and config.train.parts.lm.lr_mult == 0.1
    assert not config.train.parts.vision.train  # the rest of the preset stays
    assert config.train.loss_scope == "answers"


def test_an_unknown_stage_names_the_valid_ones():
    from megavl.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"train.stage = 'warmup': must be one of align, pretrain, sft"):
        validate(load_config(str(TINY_CONFIG), ["train.stage=warmup"]), 1)


@pytest.mark.slow
def test_the_four_stage_chain_records_its_lineage_and_each_stage_starts_its_schedule_afresh(
        data_dir, tmp_path):
    from megatron.core import dist_checkpointing

    align, pretrain = tmp_path / "align", tmp_path / "pretrain"
    out = _train(1, _overrides(data_dir, align, steps=2, extra=["train.stage=align", "train.warmup_steps=1"]))
    assert "trainable parts: vision frozen, adapter trains, lm frozen, lm_embeddings frozen, " \
           "vision_lora frozen, router" not in out  # the tiny dense model has no router
    assert "trainable parts: vision frozen, adapter trains, lm frozen, lm_embeddings frozen, vision_lora frozen" in out
    first = f"{align}/checkpoints/iter_0000002"
    out = _train(1, _overrides(data_dir, pretrain, steps=3, extra=[
        "train.stage=pretrain", f"checkpoint.pretrained={align}/checkpoints", "train.warmup_steps=1"]))
    assert f"started from the weights in {align}/checkpoints" in out
    assert f"stage lineage: align ({first}, step 2) -> pretrain" in out
    assert "trainable parts: vision trains, adapter trains, lm trains" in out
    # A fresh schedule: step 1 runs at the warmup's end value like any first step, not at step 3's.
    align_rows, _ = _metrics(align)
    rows, _ = _metrics(pretrain)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == align_rows[0]["lr"]
    common = dist_checkpointing.load_common_state_dict(f"{pretrain}/checkpoints/iter_0000003")
    assert common["train_state"]["extra"]["lineage"] == [{"stage": "align", "checkpoint": first, "step": 2}]
    assert common["config"]["train"]["stage"] == "pretrain"

    # The rest of the ZAYA1-VL chain: new tokens, a stage training only their rows, then sft.
    from megavl.convert.vocab_expansion import expand_vocab
    from megavl.data.tokenizer import load_tokenizer

    expanded, expand, sft = tmp_path / "expanded", tmp_path / "expand", tmp_path / "sft"
    old_size = len(load_tokenizer(f"{data_dir}/tokenizer"))
    result = expand_vocab(f"{pretrain}/checkpoints", f"{data_dir}/tokenizer", ["<|ref_start|>", "<|ref_end|>"],
                          str(expanded), init="tokens", log=lambda line: None)
    assert result.first_new_id == old_size
    new = [f"data.tokenizer={expanded}/tokenizer", f"model.lm.vocab_size={result.new_vocab_size}"]
    out = _train(1, _overrides(data_dir, expand, steps=2, extra=[
        *new, "train.stage=expand_embeddings", f"train.embedding_rows_from={old_size}",
        f"checkpoint.pretrained={expanded}", "train.warmup_steps=1"]))
    assert (f"stage expand_embeddings: trains lm_embeddings, output_layer; frozen: vision, adapter, lm, "
            f"vision_lora, router; embedding rows >= {old_size} only") in out
    out = _train(1, _overrides(data_dir, sft, steps=2, extra=[
        *new, "train.stage=sft", "train.optimizer=muon", f"checkpoint.pretrained={expand}/checkpoints",
        "train.warmup_steps=1"]))
    assert (f"stage lineage: align ({first}, step 2) -> pretrain ({pretrain}/checkpoints/iter_0000003, step 3) "
            f"-> expand_vocab ({expanded}) -> expand_embeddings ({expand}/checkpoints/iter_0000002, step 2) -> sft") in out
    assert "optimizer: Muon for " in out
