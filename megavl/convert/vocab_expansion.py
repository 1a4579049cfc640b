"""megavl checkpoint + tokenizer -> the same model with new special tokens (tools/expand_vocab.py).

The new tokens take ids len(tokenizer) onwards. When they fit in the rows the embedding
table already has beyond the tokenizer (padding rows: Qwen's 151936-row tables have a few
hundred), the table keeps its size; otherwise model.lm.vocab_size grows to the next multiple
of ``vocab_multiple`` at or above the new tokenizer's length, which keeps it divisible by the
tensor-parallel sizes people pick. Every tensor is copied; the input embedding's and the
output layer's rows of the new tokens are initialised (``INITS``), rows added beyond the
tokenizer are zero, and every other row and id (the image token's too) stays as it was.

The output folder loads like a converted one: ``checkpoint.pretrained`` for the
``expand_embeddings`` stage (with ``train.embedding_rows_from`` = the first new id, only the
new rows train), and the converters.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megavl.config import Config, dump_config
from megavl.convert.errors import ConversionError
from megavl.convert.files import CONFIG_FILE, SOURCE_HF_CONFIG, SOURCE_VISION_CONFIG
from megavl.convert.hf_io import check_new_folder
from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
from megavl.convert.tokens import load_tokenizer_for

# mean: the mean of the old tokens' rows; tokens: the mean of the rows of the pieces the new
# token's text splits into under the old tokenizer (the usual start for grounding tokens);
# normal: N(0, init_std).
INITS = ("mean", "tokens", "normal")
EMBEDDING_WEIGHT = "language_model.embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "language_model.output_layer.weight"  # absent when the embeddings are tied
TOKENIZER_DIR = "tokenizer"
SUMMARY_FILE = "vocab_expansion.json"
DEFAULT_VOCAB_MULTIPLE = 128


@dataclass
class ExpansionResult:
    config: Config  # the expanded model's
    out_dir: str
    old_tokenizer_size: int
    old_vocab_size: int
    new_vocab_size: int
    added_tokens: dict[str, int]
    init: str

    @property
    def first_new_id(self) -> int:
        return self.old_tokenizer_size

    def training_overrides(self) -> list[str]:
        """The --set values that train the new rows alone from out_dir."""
        return [
            "train.stage=expand_embeddings", f"train.embedding_rows_from={self.first_new_id}",
            f"checkpoint.pretrained={self.out_dir}", f"data.tokenizer={os.path.join(self.out_dir, TOKENIZER_DIR)}",
            f"model.lm.vocab_size={self.new_vocab_size}",
        ]


def expanded_vocab_size(vocab_size: int, tokenizer_size: int, multiple: int) -> int:
    """The rows the table needs for tokenizer_size tokens: as many as it has when they fit,
    else the next multiple of `multiple` at or above tokenizer_size."""
    if tokenizer_size <= vocab_size:
        return vocab_size
    return -(-tokenizer_size // multiple) * multiple


def _check_options(tokens: Sequence[str], init: str, init_std: float, vocab_multiple: int) -> None:
    problems = []
    if not tokens:
        problems.append("--add-tokens: no tokens given; name at least one, e.g. --add-tokens '<|ref|>'")
    empty = [repr(t) for t in tokens if not t.strip()]
    if empty:
        problems.append(f"--add-tokens {' '.join(empty)}: a token must have text other than whitespace")
    repeated = sorted({t for t in tokens if list(tokens).count(t) > 1})
    if repeated:
        problems.append(f"--add-tokens: {', '.join(repeated)} given more than once; give each token once")
    if init not in INITS:
        problems.append(f"--init {init!r}: must be one of {', '.join(INITS)}")
    if not init_std > 0:
        problems.append(f"--init-std {init_std}: must be > 0")
    if vocab_multiple < 1:
        problems.append(f"--vocab-multiple {vocab_multiple}: must be >= 1 (e.g. 128)")
    if problems:
        raise ConversionError("\n".join(problems))


def add_tokens(tokenizer, tokens: Sequence[str], where: str) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Adds tokens as special tokens; returns each token's pieces under the old tokenizer and its new id."""
    vocab = tokenizer.get_vocab()
    present = [f"{t} (id {vocab[t]})" for t in tokens if t in vocab]
    if present:
        raise ConversionError(f"--add-tokens: the tokenizer {where} already has {', '.join(present)}; "
                              "give only tokens it lacks")
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in tokens}
    first = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    ids = dict(zip(tokens, tokenizer.convert_tokens_to_ids(list(tokens))))
    expected = dict(zip(tokens, range(first, first + len(tokens))))
    if ids != expected or len(tokenizer) != first + len(tokens):
        raise ConversionError(f"--tokenizer {where}: the new tokens got ids {ids}, expected {expected} "
                              f"(ids from len(tokenizer) = {first} on, in the order given)")
    return pieces, ids


def new_rows(old: torch.Tensor, init: str, pieces: list[list[int]], old_tokens: int, std: float,
              generator: torch.Generator) -> torch.Tensor:
    """The initial rows of the new tokens, one per entry of pieces, from the old table `old`."""
    if init == "mean":
        row = old[:old_tokens].double().mean(dim=0)
        return row.expand(len(pieces), -1).to(old.dtype)
    if init == "tokens":
        return torch.stack([old[ids].double().mean(dim=0) for ids in pieces]).to(old.dtype)
    return (torch.randn(len(pieces), old.shape[1], generator=generator, dtype=torch.float64) * std).to(old.dtype)


def _header(load_dir: str) -> list[str]:
    """The provenance comment lines at the top of the source's megavl_config.yaml, if any."""
    path = os.path.join(load_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.rstrip("\n"))
    return lines


@torch.no_grad()
def expand_vocab(
    load_dir: str,
    tokenizer_dir: str,
    tokens: Sequence[str],
    out_dir: str,
    init: str = "mean",
    init_std: float = 0.02,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> ExpansionResult:
    """Writes load_dir's model with `tokens` added to its tokenizer (and embedding rows) to out_dir.

    Raises ConversionError, naming the option, for anything that prevents it.
    """
    from megavl.training.checkpoint import load_model_weights, save_model_weights
    from megavl.training.checkpointer import stage_lineage

    tokens = list(tokens)
    _check_options(tokens, init, init_std, vocab_multiple)
    config = load_megavl_config(load_dir)
    check_new_folder(out_dir, "--out")
    tokenizer = load_tokenizer_for(tokenizer_dir, config)
    old_tokens = len(tokenizer)
    pieces, ids = add_tokens(tokenizer, tokens, tokenizer_dir)

    lm = config.model.lm
    old_vocab = lm.vocab_size
    new_vocab = expanded_vocab_size(old_vocab, len(tokenizer), vocab_multiple)
    tp = config.parallel.tensor
    if new_vocab % tp:
        raise ConversionError(
            f"--vocab-multiple {vocab_multiple}: the new model.lm.vocab_size {new_vocab} must be divisible by "
            f"the checkpoint's parallel.tensor = {tp}; give a multiple of {tp} (e.g. 128)")
    expanded = copy.deepcopy(config)
    expanded.model.lm.vocab_size = new_vocab

    old_model = build_single_process_model(config)
    fresh = load_model_weights(old_model, load_dir, allow_fresh_adapters=True)
    new_model = build_single_process_model(expanded)
    old_tensors, new_tensors = model_tensors(old_model), model_tensors(new_model)
    if set(old_tensors) != set(new_tensors):  # only the vocabulary's length differs between the two
        raise ConversionError(f"--load {load_dir}: the model with {new_vocab} rows has other tensors: "
                              f"{sorted(set(old_tensors) ^ set(new_tensors))}")
    generator = torch.Generator().manual_seed(seed)
    new_ids = torch.tensor(list(ids.values()))
    grown = []
    for name, target in new_tensors.items():
        source = old_tensors[name]
        if name not in (EMBEDDING_WEIGHT, OUTPUT_WEIGHT):
            target.copy_(source)
            continue
        target.zero_()  # rows added beyond the tokenizer stay zero
        target[:old_vocab].copy_(source)
        target[new_ids] = new_rows(source, init, list(pieces.values()), old_tokens, init_std, generator)
        grown.append(name)
    del old_model, old_tensors
    gc.collect()

    os.makedirs(out_dir, exist_ok=True)
    # A training checkpoint's chain (align -> pretrain -> ...) continues through the expansion.
    save_model_weights(new_model, out_dir, made_by="expand_vocab", lineage=stage_lineage(load_dir))
    first, last = old_tokens, old_tokens + len(tokens) - 1
    result = ExpansionResult(expanded, out_dir, old_tokens, old_vocab, new_vocab, ids, init)
    header = _header(load_dir) + [
        f"# vocabulary expanded from {load_dir} by tools/expand_vocab.py: {len(tokens)} special tokens added "
        f"to the tokenizer {tokenizer_dir} (saved in {TOKENIZER_DIR}/)",
        f"# model.lm.vocab_size {old_vocab} -> {new_vocab}; new rows (init: {init}): token ids {first}..{last} of "
        + " and ".join(grown),
        *([f"# rows {len(tokenizer)}..{new_vocab - 1} were added beyond the tokenizer and are zero"]
          if new_vocab > old_vocab and new_vocab > len(tokenizer) else []),
        "# train only the new rows with --set " + " ".join(result.training_overrides()[:2]),
    ]
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n")
        f.write(dump_config(expanded))
    # The exporter takes the fields megavl does not model from the source's config.json.
    for name in (SOURCE_HF_CONFIG, SOURCE_VISION_CONFIG):
        if os.path.isfile(os.path.join(load_dir, name)):
            shutil.copyfile(os.path.join(load_dir, name), os.path.join(out_dir, name))
    tokenizer.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump({"old_tokenizer_size": old_tokens, "old_vocab_size": old_vocab, "new_vocab_size": new_vocab,
                   "added_tokens": ids, "init": init}, f, indent=2)
        f.write("\n")

    table = "kept its size" if new_vocab == old_vocab else f"grew to the next multiple of {vocab_multiple}"
    log(f"expand: {len(tokens)} tokens added to {tokenizer_dir} ({old_tokens} -> {len(tokenizer)} tokens): "
        + ", ".join(f"{t} = {i}" for t, i in ids.items()))
    log(f"expand: model.lm.vocab_size {old_vocab} -> {new_vocab} ({table}); the new rows of "
        f"{' and '.join(grown)} start as init {init}" + (f" (std {init_std})" if init == "normal" else ""))
    if fresh:
        log(f"expand: note: {len(fresh)} vision-adapter tensors the checkpoint lacks were written fresh")
    log(f"expand: wrote the weights, {CONFIG_FILE}, {TOKENIZER_DIR}/ and {SUMMARY_FILE} to {out_dir}")
    log("expand: train only the new rows with: --set " + " ".join(result.training_overrides()))
    del new_model, new_tensors
    gc.collect()
    return result
