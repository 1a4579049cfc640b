"""train.embedding_rows_from = N: in the LM's input embedding and output layer only the rows
of token ids >= N train (e.g. the new tokens tools/expand_vocab.py added); the rows below stay
bit-identical.

``zero_frozen_row_grads`` zeroes the gradient rows below N in each such weight's
``main_grad`` after megatron's forward-backward schedule, whose finalize has reduced the
gradients into DDP's buffers, and before the optimizer reads them. ``main_grad`` is where
every path leaves the gradient (DDP's backward hooks, and gradient-accumulation fusion, which
writes it directly), and both optimizers take their fp32 gradients from it in ``step()``
(the distributed one its shard). Adam then sees zero gradients in those rows from the first
step on: its moments stay 0, their update is exactly 0 and, with the parts' wd_mult 0 (which
config/checks.py requires), decoupled weight decay leaves them alone too.

Which rows a rank holds: megatron splits both tables into contiguous, equal row blocks over
tensor parallelism (VocabParallelEmbedding records its block's first id as
``vocab_start_index``; the output ColumnParallelLinear gives rank r rows r*n .. (r+1)*n-1).
With pipeline parallelism the embedding lives on the first stage and the output layer on the
last; tied embeddings on several stages keep a copy there as the output layer's weight, whose
gradient megatron all-reduces with the embedding's before this runs, so both are masked alike.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from megavl.config import Config

EMBEDDING = "language_model.embedding.word_embeddings"
OUTPUT_LAYER = "language_model.output_layer"


@dataclass(frozen=True)
class VocabRows:
    """A weight with one row per token id, as held on this rank."""

    name: str
    param: torch.nn.Parameter
    first_token: int  # the token id of its first local row

    def frozen_local_rows(self, embedding_rows_from: int) -> int:
        """How many of its local rows (from the first) have token ids below embedding_rows_from."""
        return min(max(embedding_rows_from - self.first_token, 0), self.param.shape[0])


def _plain(name: str) -> str:
    while name.startswith("module."):  # DDP's (and Float16Module's) wrapping
        name = name[len("module."):]
    return name


def _find_vocab_rows(chunk: torch.nn.Module) -> list[VocabRows]:
    found = []
    for name, module in chunk.named_modules():
        name = _plain(name)
        # An output layer that shares the embedding's weight on the same stage holds none itself.
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if name == EMBEDDING:
            found.append(VocabRows(f"{name}.weight", weight, module.vocab_start_index))
        elif name == OUTPUT_LAYER:
            found.append(VocabRows(f"{name}.weight", weight,
                                   ps.get_tensor_model_parallel_rank() * weight.shape[0]))
    return found


# Which weights a chunk holds never changes, so each chunk is searched once (on its first step);
# weak keys let a chunk that is no longer used go.
_HELD: "weakref.WeakKeyDictionary[torch.nn.Module, list[VocabRows]]" = weakref.WeakKeyDictionary()


def vocab_rows(chunk: torch.nn.Module) -> list[VocabRows]:
    """The input embedding and output-layer weights this rank's chunk holds (none, one or both)."""
    if chunk not in _HELD:
        _HELD[chunk] = _find_vocab_rows(chunk)
    return _HELD[chunk]


@torch.no_grad()
def zero_frozen_row_grads(config: Config, model_chunks: list) -> None:
    """Zeroes the main_grad rows of token ids below train.embedding_rows_from (nothing when unset)."""
    first = config.train.embedding_rows_from
    if first is None:
        return
    for chunk in model_chunks:
        for rows in vocab_rows(chunk):
            frozen = rows.frozen_local_rows(first)
            # A frozen part has no gradient buffer (train.parts); nothing to mask there.
            if rows.param.requires_grad and frozen:
                rows.param.main_grad[:frozen].zero_()
