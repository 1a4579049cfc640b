"""Training checkpoints in megatron's dist_checkpointing format (torch_dist).

A checkpoint directory holds ``iter_XXXXXXX/`` folders and a ``latest`` file
naming the newest complete one. A save writes ``iter_X.partial/`` and, once every
rank has finished, megavl/training/checkpoint_files.py puts it in place so that
``latest`` only ever names a complete folder: a crash or a failed write at any
point leaves the previous checkpoint loadable.

Each tensor is stored once with its global shape and the slice every rank
owns, so weights (and the distributed optimizer's state, saved in its
dp-reshardable form) load under a different layout; see load_checkpoint for
what is restored when the layout changes.

Checkpoints of megatron-core's local layers (the CPU path) and of Transformer
Engine's (the GPU path) load into each other: their tensor keys are the same
(megavl/models/specs.py), and TE 2.x modules' ``_extra_state`` (FP8 scaling
metadata) is left at the module's own initial state when a checkpoint has none
(absent_extra_state), as TE does for a fresh module; a local model ignores the
``_extra_state`` a TE checkpoint holds.

Scripts that save must guard their entry point with ``if __name__ == "__main__":``
(the saver starts a helper process).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megavl.config import Config, config_to_dict
from megavl.models.parts import trained_parts
from megavl.training.checkpoint_files import LATEST, PARTIAL, iteration_dir, latest_checkpoint, publish
from megavl.training.optimizer import initialize_state_for_loading, optimizer_form, restore_adam_steps

__all__ = [
    "LATEST",
    "BackgroundSaves",
    "CheckpointSaveError",
    "TrainState",
    "iteration_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "save_model_weights",
    "stored_config",
]

log = logging.getLogger(__name__)

_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
# What a failed save raises: torch's writers report their workers' failures as a
# CheckpointException, which derives from BaseException, not Exception.
_SAVE_FAILURES = (Exception, CheckpointException)


class CheckpointSaveError(RuntimeError):
    """A save that did not complete on every rank; the previous checkpoint is still latest."""


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer: where it was."""

    step: int = 0
    consumed_microbatches: int = 0
    extra: dict = field(default_factory=dict)


def stored_config(root: str) -> Optional[dict]:
    """The config (plain data) the newest checkpoint under root was saved with, if any."""
    folder = latest_checkpoint(root)
    if folder is None:
        return None
    return dist_checkpointing.load_common_state_dict(folder).get("config")


def _layout() -> dict:
    return {
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "data": ps.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_objects(rng: Any, data: Any) -> dict:
    """RNG per (PP, TP) rank; data position per DP rank (identical on its TP/PP replicas)."""
    pp, tp, dp = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    pp_size, tp_size, dp_size = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    return {
        "rng_state": ShardedObject("rng_state", rng, (pp_size, tp_size), (pp, tp), replica_id=dp),
        "data_state": ShardedObject(
            "data_state", data, (dp_size,), (dp,), replica_id=pp * tp_size + tp
        ),
    }


EXTRA_STATE_SUFFIX = "_extra_state"


def absent_extra_state(model_state: dict, folder: str) -> list[str]:
    """Removes from model_state the ``_extra_state`` objects the checkpoint in folder lacks, and
    returns their names.

    Transformer Engine 2.x modules keep their FP8 scaling state (amax history, scales) as a
    ``_extra_state`` object; megatron-core's local layers and megavl's norms have none, so a
    checkpoint made on the CPU (or converted from Hugging Face) has no such objects, and
    megatron's load refuses a requested key the checkpoint lacks. A TE module that is not given
    its extra state keeps the one it was built with, as a fresh module does (its FP8 history
    then starts again). Every other tensor must still be in the checkpoint.
    """
    requested = {name: item for name, item in model_state.items()
                 if name.endswith(EXTRA_STATE_SUFFIX) and isinstance(item, ShardedObject)}
    if not requested:
        return []
    saved = set(load_sharded_metadata(folder))
    absent = sorted(name for name, item in requested.items() if item.unique_key not in saved)
    for name in absent:
        del model_state[name]
    return absent


def _load_model_state(model, state: dict, folder: str, absent: list[str], may_miss: tuple[str, ...] = ()) -> None:
    """model.load_state_dict, allowing exactly the absent extra states (and may_miss) to be missing."""
    allowed = set(absent) | set(may_miss)
    if not allowed:
        model.load_state_dict(state, strict=True)
        return
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - allowed
    if missing or result.unexpected_keys or (set(may_miss) - set(result.missing_keys)):
        raise RuntimeError(f"loading {folder}: missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}")
    if absent:
        log.info("checkpoint %s has no Transformer Engine extra state for %d modules (saved by local layers): "
                 "their FP8 scaling state starts fresh", folder, len(absent))


def _sharded_state(model, optimizer, data_state: Any, loading: bool, folder: Optional[str] = None) -> tuple[dict, list]:
    """The sharded state to save or load, and (loading from folder) the extra states it lacks."""
    model_state = model.sharded_state_dict()
    absent = absent_extra_state(model_state, folder) if loading and folder is not None else []
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=dict(_OPTIMIZER_FORMAT)
        )
    state.update(_per_rank_objects(_rng_state(), data_state))
    return state, absent


def save_checkpoint(
    root: str,
    config: Config,
    model,
    optimizer,
    scheduler,
    train_state: TrainState,
    data_state: Any,
    background: Optional["BackgroundSaves"] = None,
) -> str:
    """Saves everything needed to resume; returns the checkpoint folder.

    Every rank learns whether the save succeeded everywhere; if not, each raises
    CheckpointSaveError naming the folder and the first reason, and latest still
    names the previous checkpoint. With ``background`` the tensors are staged
    here and written by a helper process while training goes on; the folder
    becomes latest when a later ``background.poll()`` finds every rank done.
    """
    final = iteration_dir(root, train_state.step)
    partial = final + PARTIAL
    rank0 = dist.get_rank() == 0
    error = None
    if rank0:
        error = _attempt(lambda: (shutil.rmtree(partial, ignore_errors=True), os.makedirs(partial)))
    _raise_if_failed(error, partial)
    state, _ = _sharded_state(model, optimizer, data_state, loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["train_state"] = vars(train_state).copy()
    state["config"] = config_to_dict(config)
    state["layout"] = _layout()
    state["trained_parts"] = trained_parts(config)
    state["optimizer_form"] = optimizer_form(config, ps.get_data_parallel_world_size(), optimizer)

    def put_in_place():
        _raise_if_failed(_attempt(lambda: publish(root, partial, final)) if rank0 else None, partial)

    if background is None:
        _raise_if_failed(_attempt(lambda: dist_checkpointing.save(state, partial)), partial)
        put_in_place()
    else:
        request = []
        _raise_if_failed(_attempt(lambda: request.append(
            dist_checkpointing.save(state, partial, async_sharded_save=True))), partial)
        background.submit(request[0], partial, final, put_in_place)
    return final


class BackgroundSaves:
    """Checkpoint writes that run while training goes on (``checkpoint.async_save``).

    megatron's AsyncCallsQueue forks a helper process per save that writes the
    tensors staged at save time (copied to host memory on a GPU; on the CPU the
    fork's copy-on-write pages are the snapshot), so later steps cannot change
    what is written. ``poll()`` is a collective: every rank calls it at the same
    points (each step of the loop), and a save is finished (metadata written,
    folder published, latest moved) only once every rank's writer is done.
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._folders: list[tuple[str, str]] = []  # (partial, final), oldest first

    @property
    def pending(self) -> int:
        return len(self._folders)

    def submit(self, request, partial: str, final: str, put_in_place) -> None:
        request.add_finalize_fn(put_in_place)
        self._queue.schedule_async_request(request)
        self._folders.append((partial, final))

    def poll(self, wait: bool = False) -> list[str]:
        """Finishes the saves whose writes are done on every rank (all of them with wait);
        returns their folders. A failed write raises CheckpointSaveError on every rank."""
        if not self._folders:
            return []
        try:
            finished = self._queue.maybe_finalize_async_calls(blocking=wait)
        except CheckpointSaveError:
            self._folders.pop(0)
            raise
        except _SAVE_FAILURES as e:  # megatron raises the writers' failures on every rank
            partial, _ = self._folders.pop(0)
            raise CheckpointSaveError(
                f"saving the checkpoint {partial} failed ({type(e).__name__}: {e}); "
                "the previous checkpoint is still the latest"
            ) from e
        done, self._folders = self._folders[:len(finished)], self._folders[len(finished):]
        return [final for _, final in done]


def _attempt(action) -> Optional[BaseException]:
    try:
        action()
    except _SAVE_FAILURES as e:  # reported to every rank by _raise_if_failed
        return e
    return None


def _raise_if_failed(error: Optional[BaseException], folder: str) -> None:
    """One collective: every rank raises if any rank failed, so none waits for the others alone."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]
    if failed:
        rank, reason = failed[0]
        raise CheckpointSaveError(
            f"saving the checkpoint {folder} failed on {len(failed)} rank(s) (rank {rank}: {reason}); "
            "the previous checkpoint is still the latest"
        ) from error


def load_checkpoint(
    path: str,
    model,
    optimizer=None,
    scheduler=None,
    data_stream=None,
    trained: Optional[dict] = None,
    form: Optional[dict] = None,
) -> TrainState:
    """Restores what the checkpoint at path (a root with `latest`, or one iter folder) holds.

    Same layout: everything. Only the DP size changed: weights, optimizer and
    schedule. TP or PP changed: weights and schedule; the optimizer state
    starts fresh (its saved form follows the TP/PP partitioning), as it does when
    ``trained`` (this run's ``trained_parts``) differs from what the checkpoint
    trained, or ``form`` (this run's ``optimizer_form``) differs from the saved one (another
    optimizer, Muon's layer-wise state at another DP size, or the distributed optimizer's state
    saved in other gradient buckets: other perf.overlap_grad_reduce or perf.bucket_size). With optimizer=None only the
    weights are loaded (fine-tuning or evaluating).
    """
    folder = latest_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(
            f"checkpoint.load={path!r}: no checkpoint there (expected a '{LATEST}' file or an iter_* folder)"
        )
    common = dist_checkpointing.load_common_state_dict(folder)
    saved, now = common.get("layout", {}), _layout()
    same_layout = saved == now
    same_model_split = {k: saved.get(k) for k in ("tensor", "pipeline")} == {
        k: now[k] for k in ("tensor", "pipeline")
    }
    saved_parts = common.get("trained_parts", trained_parts(Config()))  # older checkpoints trained everything
    saved_parts.setdefault("embedding_rows_from", None)  # recorded since embedding expansion
    same_parts = trained is None or saved_parts == trained
    saved_form = common.get("optimizer_form", {"optimizer": "adamw", "layer_wise_data_parallel": None})
    if form is not None and "gradient_buckets" not in form:
        saved_form = {k: v for k, v in saved_form.items() if k != "gradient_buckets"}  # not asked about
    elif form is not None and "gradient_buckets" not in saved_form:
        # Saved before buckets were recorded, when megatron made one bucket per buffer.
        one_each = form["gradient_buckets"] is None or all(len(b) == 1 for b in form["gradient_buckets"])
        saved_form = dict(saved_form, gradient_buckets=form["gradient_buckets"] if one_each else "one per buffer")
    same_form = form is None or saved_form == form
    with_optimizer = optimizer is not None and same_model_split and same_parts and same_form
    if with_optimizer:
        initialize_state_for_loading(optimizer)

    sharded, absent = _sharded_state(model, optimizer if with_optimizer else None, None, loading=True, folder=folder)
    if not same_layout:
        # Per-rank RNG and data positions have no meaning in another layout.
        sharded.pop("rng_state")
        sharded.pop("data_state")
    state = dist_checkpointing.load(sharded, folder)
    _load_model_state(model, state["model"], folder, absent)
    if with_optimizer:
        # In fp32 the distributed optimizer's main params are views of the model's
        # params; megatron copies into them in place, which autograd forbids outside no_grad.
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        restore_adam_steps(optimizer)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng_state(state["rng_state"])
        if data_stream is not None and state["data_state"] is not None:
            data_stream.load_state_dict(state["data_state"])
    elif optimizer is not None:
        log.warning(
            "checkpoint %s was saved with layout %s, this run is %s: restored weights%s and schedule; "
            "RNG and data positions start fresh",
            folder, saved, now, ", optimizer" if with_optimizer else " (optimizer state starts fresh)",
        )
    if optimizer is not None and not same_form:
        buckets_only = {k: v for k, v in saved_form.items() if k != "gradient_buckets"} == {
            k: v for k, v in form.items() if k != "gradient_buckets"}
        if buckets_only:
            # Another TP/PP split also gives other buckets; the layout's warning above says so.
            if same_model_split:
                log.warning("checkpoint %s holds distributed-optimizer state saved in other gradient buckets "
                            "(parameters per bucket %s, this run's %s; perf.overlap_grad_reduce and perf.bucket_size "
                            "decide them, and megatron's default bucket size grows with DP above 40): this run's "
                            "optimizer starts fresh; resume with that run's perf settings to keep it",
                            folder, saved_form["gradient_buckets"], form["gradient_buckets"])
        else:
            log.warning("checkpoint %s holds optimizer state of the form %s, this run's is %s: "
                        "this run's optimizer starts fresh", folder, saved_form, form)
    if optimizer is not None and not same_parts:
        log.warning("checkpoint %s trained other parts or multipliers (train.parts) than this run: "
                    "its optimizer state is not restored; this run's optimizer starts fresh", folder)
    return TrainState(**state["train_state"])


def save_model_weights(model, directory: str, made_by: Optional[str] = None,
                       lineage: Optional[list] = None) -> None:
    """Weights only, e.g. a converted or freshly initialised model; ``made_by`` (the tool) and
    ``lineage`` (the stages that led to the weights it transformed) keep a recipe's chain whole."""
    os.makedirs(directory, exist_ok=True)
    state = {"model": model.sharded_state_dict()}
    if made_by is not None:
        state["made_by"] = made_by
    if lineage:
        state["lineage"] = lineage
    dist_checkpointing.save(state, directory)


def load_model_weights(model, directory: str, allow_fresh_adapters: bool = False) -> list[str]:
    """Loads weights only. Returns the names of vision adapters that started fresh.

    With allow_fresh_adapters, vision-LoRA tensors the checkpoint lacks (a model
    converted from Hugging Face has none) keep their initial values, which
    leave the model's outputs unchanged; every other tensor must be present.
    """
    folder = latest_checkpoint(directory)
    if folder is None:
        raise FileNotFoundError(f"{directory!r} is not a megavl (dist_checkpointing) checkpoint")
    sharded = model.sharded_state_dict()
    saved = set(dist_checkpointing.load_tensors_metadata(folder))
    absent = [
        name for name, item in sharded.items()
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and item.key not in saved
    ]
    fresh = [name for name in absent if allow_fresh_adapters and name.endswith(("lora_a", "lora_b"))]
    missing = sorted(set(absent) - set(fresh))
    if missing:
        hint = (" (vision adapters can start fresh: load it with checkpoint.pretrained)"
                if all(name.endswith(("lora_a", "lora_b")) for name in missing) else "")
        raise ValueError(f"{folder} lacks {len(missing)} tensors the model needs{hint}: {missing[:20]}")
    for name in fresh:
        del sharded[name]
    absent_extra = absent_extra_state(sharded, folder)
    state = dist_checkpointing.load({"model": sharded}, folder)
    _load_model_state(model, state["model"], folder, absent_extra, may_miss=tuple(fresh))
    return fresh
