"""megavl's megatron-energon task encoder: records -> packed, collated microbatches.

It runs in energon's dataloader workers (megavl/data/energon_stream.py builds
the loader around it):

1. preencode_sample: one crude WebDataset record -> its tokens and image plans
   (records.py: the dataset's resolution policy from the image headers, chat
   encoding), or a failure with its reason. No pixels are decoded yet, so a
   large packing buffer costs only the records' encoded bytes;
2. select_samples_to_pack: a buffer of records -> packs, first-fit decreasing
   under train.seq_length, data.max_images_per_pack and
   data.max_vision_tokens_per_pack;
3. pack_selected_samples: the image back end decodes all of the pack's images
   in one batch, on the CPU, and the pack becomes one row of seq_length tokens.
   With data.decode_images_in = trainer the pack instead carries each image's
   encoded bytes and plan, decoded after the loader on the training device
   (trainer_decode.py);
4. batch: train.micro_batch_size rows -> a microbatch, with the pack's
   statistics (tokens, vision tokens, records read and failed per dataset).

Failures (records that do not decode, or fit no pack) ride along in a pack
instead of vanishing in the worker, so the training process counts and logs
every one, and the counts are restored exactly with the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megavl.config import Config, ResolutionConfig
from megavl.data.batch import collate_rows, pack_row
from megavl.data.conversation import pad_token_id
from megavl.data.image_backends import select_backend
from megavl.data.balance import microbatch_vision_tokens
from megavl.data.packing import GreedyPacker, sample_vision_tokens
from megavl.data.records import PlannedRecord, RecordDecoder, RecordSkip
from megavl.data.trainer_decode import EncodedImage, with_rows


def resolution_for(config: Config, subflavors: dict) -> ResolutionConfig:
    """data.resolution with the dataset's ``subflavors.resolution`` fields over it."""
    override = subflavors.get("resolution") or {}
    return dataclasses.replace(config.data.resolution, **override)


def dataset_name(crude: dict) -> str:
    """The name metrics use: ``subflavors.name``, else the dataset folder's name."""
    name = (crude.get("__subflavors__") or {}).get("name")
    if name:
        return str(name)
    sources = crude.get("__sources__") or ()
    if sources:
        return Path(str(sources[0].dataset_path)).name
    return "unknown"


def energon():
    # Imported on first use: megavl's model code and tools do not need energon.
    import megatron.energon as energon

    return energon


def _crude_as_is(crude: dict) -> dict:
    return crude


def make_task_encoder(config: Config, tokenizer, seed: int, max_pixels: Optional[int],
                      decode_in_trainer: bool = False):
    """A megatron-energon TaskEncoder for megavl's records (the class is built here so that
    energon is imported only when a loader is made). decode_in_trainer: packs carry encoded
    images for trainer_decode.py instead of pixels."""
    e = energon()
    stateless = e.stateless

    class VLMTaskEncoder(e.DefaultTaskEncoder):
        cookers = [e.Cooker(stateless(e.task_encoder.cooking.cooker(_crude_as_is)))]
        # Members stay bytes: images are decoded by megavl's back end.
        decoder = None
        # Failures are reported in-band, so energon's own tolerance only
        # catches bugs in this class.
        __default_failure_tolerance__ = 100

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.seq_length = config.train.seq_length
            self.merge = config.model.vision.spatial_merge_size
            self.max_pixels = max_pixels
            self.tokenizer = tokenizer
            self.seed = seed
            self.decode_in_trainer = decode_in_trainer
            self._decoder: Optional[RecordDecoder] = None

        def _record_decoder(self) -> RecordDecoder:
            # Built in the process that decodes (a worker), where the back end must live. The
            # loader decodes on the CPU: its batches are pinned, which CUDA tensors refuse.
            if self._decoder is None:
                backend = None if self.decode_in_trainer else select_backend(
                    self.config.data.image_backend, torch.device("cpu"),
                    max_image_pixels=self.config.data.max_image_pixels)
                self._decoder = RecordDecoder(self.tokenizer, self.config, self.seed, backend)
            return self._decoder

        @stateless
        def preencode_sample(self, crude: dict) -> dict:
            """Tokens and image plans from the JSON and the image headers; no pixels yet,
            so energon's packing buffer holds only encoded bytes."""
            key = str(crude.get("__key__"))
            item = {"__restore_key__": crude["__restore_key__"], "key": key, "dataset": dataset_name(crude),
                    "sample": None, "images": None, "failure": None}
            members = {k: v for k, v in crude.items() if not k.startswith("__")}
            with _failures_recorded([item]):
                policy = resolution_for(self.config, crude.get("__subflavors__") or {})
                planned = self._record_decoder().plan(key, members, policy, self.max_pixels)
                item["sample"], item["images"] = planned.sample, planned.images
            return item

        def _render(self, items: list[dict]) -> None:
            """Decodes the pack's images, all in one back-end batch."""
            with _failures_recorded(items):
                rendered = self._record_decoder().render([PlannedRecord(i["sample"], i["images"]) for i in items])
                for item, result in zip(items, rendered):
                    if isinstance(result, RecordSkip):
                        item["failure"] = (result.reason, result.detail)
                    else:
                        item["sample"] = result
            for item in items:
                item["images"] = None

        def select_samples_to_pack(self, items: list[dict]) -> list[list[dict]]:
            return select_packs(items, self.config)

        @stateless
        def pack_selected_samples(self, items: list[dict]) -> dict:
            # A restored pack arrives re-encoded without the marks select_packs
            # made, so the riders that broke a budget are found again here.
            for item in items:
                mark_unpackable(item, self.config)
            good = [i for i in items if i["failure"] is None]
            encoded = None
            if self.decode_in_trainer:
                encoded = [EncodedImage(data, plan, document, index, item["key"], item["dataset"])
                           for document, item in enumerate(good)
                           for index, (data, plan) in enumerate(item["images"])]
                for item in good:
                    item["images"] = None
            else:
                self._render(good)
            samples = [i["sample"] for i in items if i["failure"] is None]
            row = pack_row(samples, self.seq_length, self.config.model.lm.image_token_id, self.merge,
                           pad_token_id(self.tokenizer), self.config.model.lm.image_positions)
            return {"__restore_key__": (), "row": row, "items": [_item_summary(i) for i in items],
                    "encoded": encoded}

        @stateless
        def batch(self, packs: list[dict]) -> dict:
            return collate_packs(packs, self.config, self.tokenizer)

    return VLMTaskEncoder()


@contextlib.contextmanager
def _failures_recorded(items: list[dict]):
    """Turns an exception while encoding records into the failure of each of them that
    has none yet (counted and logged with the keys, not lost; see the module doc)."""
    try:
        yield
    except RecordSkip as skip:
        failure = (skip.reason, skip.detail)
    except Exception as e:  # noqa: BLE001
        failure = ("decode_error", f"{type(e).__name__}: {e}")
    else:
        return
    for item in items:
        if item["failure"] is None:
            item["failure"] = failure


def _item_summary(item: dict) -> dict:
    return {"dataset": item["dataset"], "key": item["key"], "failure": item["failure"]}


def mark_unpackable(item: dict, config: Config) -> None:
    """Sets the failure of a record that no pack can hold (the budget it breaks)."""
    sample, d = item["sample"], config.data
    if item["failure"] is not None:
        return
    vision = sample_vision_tokens(sample, config.model.vision.spatial_merge_size)
    if len(sample) > config.train.seq_length:
        item["failure"] = ("too_long", f"{len(sample)} tokens > train.seq_length {config.train.seq_length}")
    elif len(sample.images) > d.max_images_per_pack:
        item["failure"] = ("too_many_images",
                           f"{len(sample.images)} images > data.max_images_per_pack {d.max_images_per_pack}")
    elif d.max_vision_tokens_per_pack and vision > d.max_vision_tokens_per_pack:
        item["failure"] = ("too_many_vision_tokens",
                           f"{vision} vision tokens > data.max_vision_tokens_per_pack {d.max_vision_tokens_per_pack}")


def select_packs(items: list[dict], config: Config) -> list[list[dict]]:
    """Groups a buffer of encoded records into packs.

    First-fit decreasing over the buffer (longest first gives the tightest
    packs); records that fit no pack are marked with the reason and, with the
    records that failed to decode, ride along in the first pack so they are
    counted by the training process.
    """
    d, merge = config.data, config.model.vision.spatial_merge_size
    riders, good = [], []
    for item in items:
        mark_unpackable(item, config)
        if item["failure"] is None:
            good.append(item)
        else:
            item["sample"] = item["images"] = None  # a rider needs neither tokens nor image bytes
            riders.append(item)
    packer = GreedyPacker(config.train.seq_length, d.max_images_per_pack, buffer_size=max(1, len(good)),
                          max_vision_tokens_per_pack=d.max_vision_tokens_per_pack, spatial_merge_size=merge)
    by_sample = {id(item["sample"]): item for item in good}
    packs: list[list[dict]] = []
    for item in sorted(good, key=lambda i: len(i["sample"]), reverse=True):
        packs += [[by_sample[id(s)] for s in pack] for pack in packer.add(item["sample"])]
    packs += [[by_sample[id(s)] for s in pack] for pack in packer.flush()]
    if riders:
        if packs:
            packs[0] = riders + packs[0]
        else:
            packs.append(riders)
    return packs


def empty_row(config: Config, tokenizer) -> dict:
    return pack_row([], config.train.seq_length, config.model.lm.image_token_id,
                    config.model.vision.spatial_merge_size, pad_token_id(tokenizer), config.model.lm.image_positions)


def collate_packs(packs: list[dict], config: Config, tokenizer) -> dict:
    """packs -> one microbatch of train.micro_batch_size rows (all-padding rows
    fill a short last batch of a finite stream) with its data statistics."""
    rows = [p["row"] for p in packs]
    rows += [empty_row(config, tokenizer) for _ in range(config.train.micro_batch_size - len(rows))]
    batch = collate_rows(rows)
    if any(p.get("encoded") is not None for p in packs):
        # Decoded after the loader (trainer_decode.py): the planned grids are final, pixels are not.
        batch["encoded_images"] = with_rows([p.get("encoded") or [] for p in packs])
        batch["pixel_values"] = None
    read: dict[str, int] = {}
    failed: dict[str, dict[str, int]] = {}
    failures = []
    for pack in packs:
        for item in pack["items"]:
            read[item["dataset"]] = read.get(item["dataset"], 0) + 1
            if item["failure"] is not None:
                reason, detail = item["failure"]
                counts = failed.setdefault(item["dataset"], {})
                counts[reason] = counts.get(reason, 0) + 1
                failures.append((item["dataset"], item["key"], reason, detail))
    batch["data_stats"] = {
        "rows": len(rows),
        "real_tokens": int((batch["document_ids"] >= 0).sum()),
        "vision_tokens": microbatch_vision_tokens(batch, config.model.vision.spatial_merge_size),
        "read": read,
        "failed": failed,
        "failures": failures,
    }
    return batch
