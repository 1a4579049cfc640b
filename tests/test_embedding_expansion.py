"""tools/expand_vocab.py and the expand_embeddings stage: new special tokens get rows in the
embedding tables (in the spare rows, or a table grown to a multiple), initialised as asked;
training with train.embedding_rows_from changes only the rows from there on, the others stay
bit-identical (in one process, at TP=2 and at PP=2); the config refuses settings that would move
the old rows; the expanded model converts to Hugging Face and back."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import NO_TASK_EVAL, TINY_CONFIG, read_json, run_torchrun, tiny_tokenizer
from workers.convert_tiny_models import megavl_tensors, qwen2_5_vl_config, quiet, randomize

NEW_TOKENS = ["<|ref|>", "<|/ref|>", "<|grounding|>"]
CORPUS = ["the cat sat on the mat and looked at the box", "a point at 12, 34 in the image of a red square",
          "answer with the coordinates of the object"]
EMBEDDING = "language_model.embedding.word_embeddings.weight"
OUTPUT = "language_model.output_layer.weight"
# A short step, and the full learning rate from the first step on.
TRAIN = ["train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=2", "train.warmup_steps=0"]
UNTIED = ["model.lm.tie_embeddings=false"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(CORPUS).save_pretrained(str(folder))
    return folder


def _tokenizer_size(tokenizer_dir) -> int:
    from megavl.data.tokenizer import load_tokenizer

    return len(load_tokenizer(str(tokenizer_dir)))


def _checkpoint(folder, overrides) -> dict[str, torch.Tensor]:
    """A random tiny megavl checkpoint (weights + megavl_config.yaml); returns its tensors."""
    from megavl.config import dump_config, load_config
    from megavl.convert.megavl_model import build_single_process_model, model_tensors
    from megavl.training.checkpoint import save_model_weights

    config = load_config(str(TINY_CONFIG), [*TRAIN, *overrides])
    model = build_single_process_model(config)
    randomize(model, seed=5)
    save_model_weights(model, str(folder))
    (folder / "megavl_config.yaml").write_text("# a random test model\n" + dump_config(config))
    return {name: t.detach().clone() for name, t in model_tensors(model).items()}


@pytest.fixture(scope="module")
def untied(megatron_world, tokenizer_dir, tmp_path_factory):
    """Untied tables without room for the new tokens: as many rows as the tokenizer has tokens
    (one more when that is odd, so that TP=2 can split them)."""
    size = _tokenizer_size(tokenizer_dir)
    folder = tmp_path_factory.mktemp("untied") / "ckpt"
    vocab = size + size % 2
    return folder, _checkpoint(folder, [*UNTIED, f"model.lm.vocab_size={vocab}"]), size


@pytest.fixture(scope="module")
def tied(megatron_world, tokenizer_dir, tmp_path_factory):
    """The tiny model's tied 2048-row table, far larger than the tokenizer."""
    folder = tmp_path_factory.mktemp("tied") / "ckpt"
    return folder, _checkpoint(folder, []), _tokenizer_size(tokenizer_dir)


def _expand(checkpoint, tokenizer_dir, out, **options):
    from megavl.convert.vocab_expansion import expand_vocab

    return expand_vocab(str(checkpoint), str(tokenizer_dir), NEW_TOKENS, str(out), log=quiet, **options)


@pytest.fixture(scope="module")
def expanded(untied, tokenizer_dir, tmp_path_factory):
    """The untied checkpoint with the new tokens, initialised from their pieces."""
    out = tmp_path_factory.mktemp("expanded") / "ckpt"
    return out, _expand(untied[0], tokenizer_dir, out, init="tokens")


def test_the_vocab_size_keeps_its_rows_when_the_tokens_fit_and_grows_to_a_multiple_otherwise():
    from megavl.convert.vocab_expansion import expanded_vocab_size

    assert expanded_vocab_size(151936, 151668, 128) == 151936  # Qwen2.5's spare rows take them
    assert expanded_vocab_size(320, 322, 128) == 384
    assert expanded_vocab_size(320, 322, 8) == 328
    assert expanded_vocab_size(320, 384, 128) == 384


def test_tokens_that_fit_take_spare_rows_start_at_the_mean_and_the_tool_says_how_to_train_them(
        tied, tokenizer_dir, tmp_path, capsys):
    from megavl.data.tokenizer import load_tokenizer
    from tools.expand_vocab import main

    checkpoint, before, size = tied
    out = tmp_path / "out"
    assert main(["--load", str(checkpoint), "--tokenizer", str(tokenizer_dir), "--add-tokens", *NEW_TOKENS,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    new_ids = list(range(size, size + len(NEW_TOKENS)))
    assert "model.lm.vocab_size 2048 -> 2048 (kept its size)" in printed, printed
    assert (f"--set train.stage=expand_embeddings train.embedding_rows_from={size} checkpoint.pretrained={out} "
            f"data.tokenizer={out}/tokenizer model.lm.vocab_size=2048") in printed, printed

    after = megavl_tensors(out)
    assert sorted(after) == sorted(before) and OUTPUT not in after  # tied: one table
    table, old = after[EMBEDDING], before[EMBEDDING]
    assert table.shape == old.shape
    others = [i for i in range(2048) if i not in new_ids]
    assert torch.equal(table[others], old[others])  # old tokens and the spare rows left over
    mean = old[:size].double().mean(dim=0).float()
    for row in new_ids:
        torch.testing.assert_close(table[row], mean, rtol=0, atol=1e-7)
    assert all(torch.equal(after[n], before[n]) for n in before if n != EMBEDDING)

    tokenizer = load_tokenizer(str(out / "tokenizer"))
    assert len(tokenizer) == size + len(NEW_TOKENS)
    assert tokenizer.encode("look" + "".join(NEW_TOKENS), add_special_tokens=False)[-3:] == new_ids
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 3
    assert read_json(out / "vocab_expansion.json") == {
        "old_tokenizer_size": size, "old_vocab_size": 2048, "new_vocab_size": 2048,
        "added_tokens": dict(zip(NEW_TOKENS, new_ids)), "init": "mean"}
    yaml = (out / "megavl_config.yaml").read_text()
    assert yaml.startswith("# a random test model\n# vocabulary expanded from")
    assert f"token ids {size}..{size + 2} of {EMBEDDING}" in yaml and "vocab_size: 2048" in yaml


def test_a_table_without_spare_rows_grows_and_new_rows_start_from_their_pieces(untied, expanded, tokenizer_dir):
    from megavl.data.tokenizer import load_tokenizer

    _, before, size = untied
    out, result = expanded
    vocab = size + size % 2
    assert (result.old_vocab_size, result.new_vocab_size) == (vocab, 384)
    assert result.config.model.lm.vocab_size == 384 and result.first_new_id == size
    old_tokenizer = load_tokenizer(str(tokenizer_dir))
    after = megavl_tensors(out)
    for name in (EMBEDDING, OUTPUT):
        table, old = after[name], before[name]
        assert table.shape == (384, old.shape[1])
        assert torch.equal(table[:size], old[:size])
        for token, row in result.added_tokens.items():
            pieces = old_tokenizer.encode(token, add_special_tokens=False)
            assert len(pieces) > 1
            torch.testing.assert_close(table[row], old[pieces].double().mean(dim=0).float(), rtol=0, atol=1e-7)
        assert not table[size + len(NEW_TOKENS):].any()  # rows grown beyond the tokenizer are zero
    assert all(torch.equal(after[n], before[n]) for n in before if n not in (EMBEDDING, OUTPUT))
    yaml = (out / "megavl_config.yaml").read_text()
    assert "vocab_size: 384" in yaml
    assert f"# rows {size + len(NEW_TOKENS)}..383 were added beyond the tokenizer and are zero" in yaml, yaml[:600]


def test_normal_init_draws_the_new_rows_with_the_given_std(untied, tokenizer_dir, tmp_path):
    _, before, size = untied
    _expand(untied[0], tokenizer_dir, tmp_path / "out", init="normal", init_std=0.5)
    after = megavl_tensors(tmp_path / "out")
    rows = {name: after[name][size:size + len(NEW_TOKENS)] for name in (EMBEDDING, OUTPUT)}
    for name, new in rows.items():
        # 3 x 128 draws: the sample std is within a few percent of 0.5; the weights' scale is 0.05.
        assert 0.42 < new.std().item() < 0.58 and abs(new.mean().item()) < 0.08, name
        assert torch.equal(after[name][:size], before[name][:size])
    assert not torch.equal(rows[EMBEDDING], rows[OUTPUT])  # independent draws


@pytest.mark.parametrize("tokens, fragments", [
    (["<|a|>", "<|b|>", "<|a|>"], ["--add-tokens: <|a|> given more than once"]),
    (["<|a|>", "<|im_start|>"], ["already has <|im_start|> (id 1)", "give only tokens it lacks"]),
    (["<|a|>", " "], ["--add-tokens ' '", "text other than whitespace"]),
], ids=["duplicate", "already-present", "blank"])
def test_tokens_that_cannot_be_added_are_refused_by_name(tied, tokenizer_dir, tmp_path, tokens, fragments):
    from megavl.convert.errors import ConversionError
    from megavl.convert.vocab_expansion import expand_vocab

    with pytest.raises(ConversionError) as info:
        expand_vocab(str(tied[0]), str(tokenizer_dir), tokens, str(tmp_path / "out"), log=quiet)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_tool_refuses_a_used_folder_and_a_multiple_tensor_parallelism_cannot_split(
        untied, tokenizer_dir, tmp_path, capsys):
    from megavl.config import dump_config, load_config
    from tools.expand_vocab import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("")
    base = ["--load", str(untied[0]), "--tokenizer", str(tokenizer_dir), "--add-tokens", *NEW_TOKENS]
    assert main([*base, "--out", str(used)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(used)!r} is not empty" in err, err
    # The same model recorded for TP=2 (the check comes before any weight is read): an odd
    # multiple above the tokenizer's length gives an odd table, which two ranks cannot split.
    two = tmp_path / "tp2"
    two.mkdir()
    config = load_config(str(untied[0] / "megavl_config.yaml"), ["parallel.tensor=2"])
    (two / "megavl_config.yaml").write_text(dump_config(config))
    assert main([*base[:1], str(two), *base[2:], "--vocab-multiple", "1001", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--vocab-multiple 1001: the new model.lm.vocab_size 1001 must be divisible by" in err, err
    assert "parallel.tensor = 2" in err, err


def _trained(overrides, pretrained, steps=2):
    """Trains a few steps from the weights in pretrained (as checkpoint.pretrained loads them);
    returns (config, weights before, weights after, the token ids the inputs held)."""
    from megavl.config import load_config, validate
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import set_seed
    from megavl.training.checkpoint import load_model_weights
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import num_microbatches, train_step

    config = load_config(str(TINY_CONFIG), [*TRAIN, *overrides, f"checkpoint.pretrained={pretrained}"])
    validate(config, 1)
    set_seed(0)
    model = build_model(config)
    load_model_weights(model, config.checkpoint.pretrained, allow_fresh_adapters=True)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    microbatches = num_microbatches(config, 1)
    batches = random_batches(config, microbatches * steps, seed=7)
    seen = torch.unique(torch.cat([b["tokens"].flatten() for b in batches]))
    for step in range(steps):
        result = train_step(config, chunks, optimizer, scheduler,
                            iter(batches[step * microbatches:(step + 1) * microbatches]), microbatches)
        assert not result.skipped
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return config, before, after, seen


def assert_only_rows_from_changed(before, after, first: int, seen: torch.Tensor, tied: bool) -> None:
    """Rows below `first` of the tables and every other weight are bit-identical. From `first` on,
    every row of the output layer moved (a tied table is the output layer too), and the input
    embedding's rows that moved are rows of tokens the inputs held (the others got no gradient)."""
    tables = {EMBEDDING} if tied else {EMBEDDING, OUTPUT}
    plain = {name.removeprefix("module."): name for name in before}
    assert tables <= set(plain) and (OUTPUT in plain) == (not tied)
    for name, key in plain.items():
        if name not in tables:
            assert torch.equal(before[key], after[key]), f"{name} changed"
            continue
        old, new = before[key], after[key]
        assert torch.equal(old[:first], new[:first]), f"{name}: rows below {first} changed"
        moved = (old[first:] != new[first:]).any(dim=1).nonzero().flatten() + first
        if name == OUTPUT or tied:
            assert moved.tolist() == list(range(first, old.shape[0])), name
        else:
            held = set(seen[seen >= first].tolist())
            assert moved.numel() and set(moved.tolist()) <= held, (moved, held)


@pytest.fixture(scope="module")
def expanded_tied(tied, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("expanded_tied") / "ckpt"
    return out, _expand(tied[0], tokenizer_dir, out)


def _stage(result, tied: bool) -> list[str]:
    return [*([] if tied else UNTIED), f"model.lm.vocab_size={result.new_vocab_size}",
            "train.stage=expand_embeddings", f"train.embedding_rows_from={result.first_new_id}"]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_training_the_expand_embeddings_stage_moves_only_the_rows_from_embedding_rows_from(
        tie, expanded, expanded_tied):
    out, result = expanded_tied if tie else expanded
    _, before, after, seen = _trained(_stage(result, tie), out)
    assert_only_rows_from_changed(before, after, result.first_new_id, seen, tie)


@pytest.mark.slow
@pytest.mark.parametrize("layout, tie", [(["parallel.tensor=2"], False), (["parallel.pipeline=2", NO_TASK_EVAL], True)],
                         ids=["tp2-untied", "pp2-tied"])
def test_split_layouts_still_move_only_the_rows_from_embedding_rows_from(
        layout, tie, expanded, expanded_tied, tmp_path):
    """TP=2 splits the untied 384-row tables 192 / 192 (rank 0 holds only old rows, rank 1 old and
    new ones); PP=2 keeps the tied table on the first stage and its copy, the output layer, on the last.
    The run's logits come from its own copies of the tables (the last stage's, under PP): the same
    logits from the saved weights in one process show every copy was masked alike."""
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model
    from megavl.training.checkpoint import load_model_weights
    from workers.train_layout import fixed_batch_logits

    out, result = expanded_tied if tie else expanded
    if not tie:
        assert result.new_vocab_size == 384 and 192 < result.first_new_id
    overrides = [*TRAIN, *_stage(result, tie)]
    run_torchrun(2, "train_layout.py", [
        "--config", str(TINY_CONFIG), "--set", *overrides, *layout, "--steps", "2",
        "--init", str(out), "--save-final", str(tmp_path / "final"), "--logits", "--out", str(tmp_path / "run.json"),
    ])
    # The worker saves weights only; the model is the expanded one.
    (tmp_path / "final" / "megavl_config.yaml").write_text((out / "megavl_config.yaml").read_text())
    before, after = megavl_tensors(out), megavl_tensors(tmp_path / "final")
    # The worker's two steps (data-parallel size 1) of two microbatches each, from its data seed.
    batches = random_batches(load_config(str(TINY_CONFIG), overrides), 4, seed=7)
    seen = torch.unique(torch.cat([b["tokens"].flatten() for b in batches]))
    assert_only_rows_from_changed(before, after, result.first_new_id, seen, tie)

    config = load_config(str(TINY_CONFIG), overrides)
    model = build_model(config)
    load_model_weights(model, str(tmp_path / "final"))
    run_logits = torch.tensor(read_json(tmp_path / "run.json")["logits"])
    torch.testing.assert_close(fixed_batch_logits(config, model), run_logits, atol=1e-5, rtol=0)


def test_the_expand_embeddings_preset_trains_only_the_embedding_tables_without_weight_decay():
    from megavl.config import load_config, validate

    config = load_config(str(TINY_CONFIG), ["train.stage=expand_embeddings", "train.embedding_rows_from=300"])
    parts = config.train.parts
    assert [name for name in ("vision", "adapter", "lm", "lm_embeddings", "output_layer", "vision_lora", "router")
            if getattr(parts, name).train] == ["lm_embeddings", "output_layer"]
    assert parts.lm_embeddings.wd_mult == parts.output_layer.wd_mult == 0.0
    assert config.train.loss_scope == "answers"
    validate(config, 1)
    # Without weight decay a part's wd_mult changes nothing, so any is accepted.
    validate(load_config(str(TINY_CONFIG), ["train.embedding_rows_from=300", "train.weight_decay=0",
                                            "model.lm.vision_lora.weight_decay=0"]), 1)


@pytest.mark.parametrize("overrides, fragments", [
    (["train.stage=expand_embeddings", "train.embedding_rows_from=0"],
     ["train.embedding_rows_from = 0: must be in (0, model.lm.vocab_size = 2048)"]),
    (["train.stage=expand_embeddings", "train.embedding_rows_from=2048"],
     ["train.embedding_rows_from = 2048: must be in (0, model.lm.vocab_size = 2048)"]),
    (["train.stage=expand_embeddings", "train.embedding_rows_from=300", "train.parts.lm.train=true",
      "train.parts.lm_embeddings.train=false", "train.parts.output_layer.train=false"],
     ["train.embedding_rows_from = 300: needs train.parts.lm_embeddings.train or train.parts.output_layer.train"]),
    (["train.embedding_rows_from=300"],
     ["train.parts.lm_embeddings.wd_mult = 1.0 with train.embedding_rows_from = 300: must be 0",
      "decoupled weight decay would shrink the rows below 300"]),
    ([*UNTIED, "train.stage=expand_embeddings", "train.embedding_rows_from=300",
      "train.parts.output_layer.wd_mult=0.5"],
     ["train.parts.output_layer.wd_mult = 0.5 with train.embedding_rows_from = 300: must be 0"]),
], ids=["zero", "past-the-table", "no-table-trains", "weight-decay", "untied-output-decay"])
def test_embedding_rows_from_settings_that_would_move_old_rows_are_refused(overrides, fragments):
    from megavl.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError) as info:
        validate(load_config(str(TINY_CONFIG), overrides), 1)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_the_expanded_model_exports_to_hugging_face_and_imports_back_unchanged(
        megatron_world, tokenizer_dir, tmp_path):
    """A Qwen2.5-VL model whose table has no spare row: expanding grows it, and both converters
    take the new size from the config (and the export carries the new tokenizer)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megavl.convert import export_to_hf, import_from_hf
    from megavl.data.tokenizer import load_tokenizer

    size = _tokenizer_size(tokenizer_dir)
    hf_config = qwen2_5_vl_config()
    hf_config.text_config.vocab_size = size + size % 2
    model = Qwen2_5_VLForConditionalGeneration(hf_config)
    randomize(model)
    model.save_pretrained(str(tmp_path / "hf"))
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), verify=False, log=quiet)
    result = _expand(tmp_path / "imported", tokenizer_dir, tmp_path / "expanded", vocab_multiple=64)
    assert result.new_vocab_size > result.old_vocab_size and result.new_vocab_size % 64 == 0

    export = export_to_hf(str(tmp_path / "expanded"), str(tmp_path / "hf_out"),
                          tokenizer=str(tmp_path / "expanded" / "tokenizer"), verify=True, log=quiet)
    assert export.verification.ok, export.verification.describe()
    exported = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert exported["text_config"]["vocab_size"] == result.new_vocab_size
    assert exported["video_token_id"] == 13  # kept from the imported model's config.json
    tokenizer = load_tokenizer(str(tmp_path / "hf_out"))
    assert tokenizer.convert_tokens_to_ids(NEW_TOKENS) == list(result.added_tokens.values())

    import_from_hf(str(tmp_path / "hf_out"), str(tmp_path / "again"), verify=False, log=quiet)
    first, second = megavl_tensors(tmp_path / "expanded"), megavl_tensors(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def test_the_stage_chain_of_a_trained_checkpoint_continues_through_the_expansion(megatron_world, tokenizer_dir,
                                                                                tmp_path):
    """align -> (expand_vocab) -> the next stage: the expanded weights keep the chain that made them."""
    from megavl.config import load_config
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training import checkpoint as ckpt
    from megavl.training.checkpointer import stage_lineage

    config = load_config(str(TINY_CONFIG), [*TRAIN, "train.stage=align"])
    model = build_model(config)
    wrap_for_training(config, model)
    root = tmp_path / "align"
    ckpt.save_checkpoint(str(root), config, model, None, None, ckpt.TrainState(step=5), None)
    out = tmp_path / "expanded"
    _expand(root, tokenizer_dir, out)
    aligned = os.path.abspath(ckpt.iteration_dir(str(root), 5))
    assert stage_lineage(str(out)) == [{"stage": "align", "checkpoint": aligned, "step": 5},
                                       {"stage": "expand_vocab", "checkpoint": os.path.abspath(out), "step": None}]
