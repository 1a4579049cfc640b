"""Measuring what activations.py estimates: the bytes autograd saves for backward in one forward.

A ``saved_tensors_hooks`` pair sees every tensor the forward saves for its
backward; the distinct storages among them (parameters excluded) are exactly
the activation memory the estimate inventories. Used by tests/test_plan.py on
the CPU and by benchmarks/plan_activation_check.py on any device and layout.
Imports torch and the model lazily: the planner itself needs neither.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable


def saved_activation_bytes(forward: Callable[[], Any], parameters: Iterable) -> int:
    """Bytes of the distinct non-parameter storages saved for backward while forward() runs."""
    import torch

    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, tuple[int, Any]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in saved:
            # Keeping the tensor keeps its memory from being reused at the same address,
            # which would otherwise hide a later storage behind this one's key.
            saved[key] = (storage.nbytes(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(nbytes for nbytes, _ in saved.values())


def probe_microbatch(config, images_per_row: int, image_side: int, seed: int = 0) -> dict:
    """micro_batch_size rows of train.seq_length tokens, each with images_per_row square images then text.

    Every row holds the same number of vision tokens, so
    ``data.max_vision_tokens_per_pack = images_per_row * (image_side / (patch * merge))**2``
    describes the microbatch exactly.
    """
    from megavl.data.batch import Sample, collate_rows, pack_row
    from megavl.data.random_samples import random_image
    from megavl.data.tokenizer import SPECIAL_TOKENS

    lm, v, t = config.model.lm, config.model.vision, config.train
    rng = random.Random(seed)
    first_text_id = len(SPECIAL_TOKENS)
    rows = []
    for _ in range(t.micro_batch_size):
        images = [random_image(rng, config, (image_side,)) for _ in range(images_per_row)]
        tokens = [first_text_id] * 4
        for image in images:
            tokens += [lm.image_token_id] * image.num_tokens(v.spatial_merge_size)
        if len(tokens) > t.seq_length:
            raise ValueError(f"{images_per_row} images of {image_side}px need {len(tokens)} tokens, more than "
                             f"train.seq_length = {t.seq_length}")
        tokens += [rng.randrange(first_text_id, lm.vocab_size) for _ in range(t.seq_length - len(tokens))]
        labels = [rng.randrange(first_text_id, lm.vocab_size) for _ in tokens]
        sample = Sample(tokens=tokens, labels=labels, turn_ids=[0] * len(tokens), images=images)
        rows.append(pack_row([sample], t.seq_length, lm.image_token_id, v.spatial_merge_size,
                             positions=lm.image_positions))
    return collate_rows(rows)


def vision_tokens_per_row(config, images_per_row: int, image_side: int) -> int:
    factor = config.model.vision.patch_size * config.model.vision.spatial_merge_size
    return images_per_row * (image_side // factor) ** 2


def measure_forward(model, config, batch, platform) -> int:
    """Saved bytes of one training-mode forward of `model` (this rank's stage) on `batch`."""
    from megavl.models import inputs

    batch = inputs.to_device(batch, config, platform.device)
    model.train()
    return saved_activation_bytes(lambda: inputs.forward(model, batch, config, platform), model.parameters())
