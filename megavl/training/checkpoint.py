"""Model weights in megatron's dist_checkpointing format (torch_dist).

A checkpoint holds each tensor once, described by its global shape and the
slice every rank owns, so it loads under a different tensor/pipeline layout
than it was saved with. Scripts that save must guard their entry point with
``if __name__ == "__main__":`` (the saver starts a helper process).
"""

from __future__ import annotations

import os

from megatron.core import dist_checkpointing

from megavl.models.vlm import VisionLanguageModel


def save_model_weights(model: VisionLanguageModel, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)


def load_model_weights(model: VisionLanguageModel, directory: str) -> None:
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"{directory!r} is not a megavl (dist_checkpointing) checkpoint")
    state = dist_checkpointing.load(model.sharded_state_dict(), directory)
    model.load_state_dict(state, strict=True)
