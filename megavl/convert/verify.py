"""Checks a conversion by comparing logits of the Hugging Face and megavl models.

Two inputs are built with megavl's own pipeline (images through
image_to_model_input, documents packed by pack_row, the attention mask the
training step uses, all through models.inputs.forward):

* one document: text and two images, unpadded;
* a packed row: three documents holding three images of different sizes
  between them, plus trailing padding, as the loader packs training rows.

Hugging Face models have no packing, so every document of an input runs
through the Hugging Face model alone (unpadded, with its own images) and its
logits are compared with megavl's at the document's place in the row; padding
is not compared. The Hugging Face model computes its own multimodal RoPE
positions, which are compared with megavl's document by document too. The two
models run one after the other, so only one is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megavl.config import Config
from megavl.data.batch import ImagePatches, Sample, collate_rows, pack_row
from megavl.data.images import image_to_model_input
from megavl.models.inputs import IGNORE_INDEX, Microbatch

DEFAULT_TOLERANCE = 1e-4
# Models below this size are verified unless the user says otherwise.
AUTO_VERIFY_MAX_PARAMS = 2_000_000_000

ONE_DOCUMENT = "one document"
PACKED_ROW = "packed row"
# Trailing padding of the packed row, as a training row ends that its documents do not fill.
PACKED_PADDING = 5


def wants_verification(verify: Optional[bool], num_parameters: int) -> bool:
    """verify=None (the default) verifies models below AUTO_VERIFY_MAX_PARAMS, which load
    twice over quickly; larger ones only when asked."""
    return num_parameters < AUTO_VERIFY_MAX_PARAMS if verify is None else verify


def _format_diff(value: float) -> str:
    return f"{value:.3e}"


def largest(values: Iterable[float]) -> float:
    """The largest value, NaN if any is NaN (Python's max would depend on the order): a weight
    that was never loaded shows as NaN logits."""
    return float(torch.tensor(list(values), dtype=torch.float64).max())


@dataclass
class InputCheck:
    """The comparison on one verification input."""

    name: str
    document_tokens: list[int]
    padding: int
    image_grids: list
    # One entry per document: the largest |logit diff| over its tokens.
    document_max_abs_diffs: list[float]
    # max_abs_diff relative to the largest |logit| of the Hugging Face model.
    max_rel_diff: float
    tolerance: float
    # None where no positions were compared.
    position_mismatches: Optional[int] = None
    # (which positions, compared with what), for describe.
    positions_compared: tuple[str, str] = ("mrope positions", "get_rope_index")

    @property
    def max_abs_diff(self) -> float:
        return largest(self.document_max_abs_diffs)

    @property
    def ok(self) -> bool:
        return (not self.position_mismatches) and all(d <= self.tolerance for d in self.document_max_abs_diffs)

    def describe(self, label: str = "") -> str:
        verdict = "OK" if self.ok else "FAILED"
        n = len(self.document_tokens)
        packed = n > 1 or self.padding
        if packed:
            what = f"{n} documents ({' + '.join(map(str, self.document_tokens))} tokens)"
            what += f" and {self.padding} padding tokens" if self.padding else ""
        else:
            what = f"{self.document_tokens[0]} tokens"
        if self.image_grids:
            what += f", images {self.image_grids} (t,h,w patches)"
        if packed:
            what += ", each document against the Hugging Face model alone"
        diff = f"max |logit diff| = {_format_diff(self.max_abs_diff)}"
        if n > 1:
            diff += f" (per document {', '.join(map(_format_diff, self.document_max_abs_diffs))})"
        line = f"{label}{self.name} {verdict}: {what}; {diff}, relative to max |logit| = "
        line += _format_diff(self.max_rel_diff)
        if self.position_mismatches is not None:
            positions, reference = self.positions_compared
            reference += " per document" if n > 1 else ""
            line += (
                f"; {positions} match {reference}" if self.position_mismatches == 0
                else f"; {positions} differ from {reference} at {self.position_mismatches} entries"
            )
        return line


def find_input(checks: Iterable[InputCheck], name: str) -> InputCheck:
    checks = list(checks)
    for check in checks:
        if check.name == name:
            return check
    raise KeyError(f"no verification input {name!r}; checked {[check.name for check in checks]}")


@dataclass
class VerifyResult:
    inputs: list[InputCheck]
    tolerance: float

    def input(self, name: str) -> InputCheck:
        return find_input(self.inputs, name)

    @property
    def max_abs_diff(self) -> float:
        return largest(check.max_abs_diff for check in self.inputs)

    @property
    def max_rel_diff(self) -> float:
        return largest(check.max_rel_diff for check in self.inputs)

    @property
    def position_mismatches(self) -> int:
        return sum(check.position_mismatches or 0 for check in self.inputs)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.inputs)

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"verification {verdict} (tolerance {self.tolerance:.0e}):"]
        lines += [f"  {check.describe()}" for check in self.inputs]
        return "\n".join(lines)


def reserved_token_ids(hf_config: dict) -> set[int]:
    """Special-token ids of a config.json (image, video, vision start/end, ...)."""
    return {v for k, v in hf_config.items() if k.endswith("_token_id") and isinstance(v, int)}


def verification_images(config: Config) -> list[Image.Image]:
    """Three fixed random images of different sizes: one spanning several attention windows,
    one small and wide, one small and tall."""
    v = config.model.vision
    unit = v.patch_size * v.spatial_merge_size
    sizes = [(v.window_size + unit, 2 * v.window_size), (2 * unit, 3 * unit), (3 * unit, 2 * unit)]  # (height, width)
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def random_text(config: Config, reserved: Iterable[int] = ()):
    """text(n): n random token ids, never a special token (reserved, the image token),
    the same sequence on every call of random_text."""
    lm = config.model.lm
    excluded = set(reserved) | {lm.image_token_id}
    allowed = torch.tensor([i for i in range(lm.vocab_size) if i not in excluded])
    generator = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()

    return text


@dataclass
class VerificationInput:
    """Documents packed into one row of their tokens plus `padding` pad tokens at the end."""

    name: str
    documents: list[Sample]
    padding: int = 0

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each document in the row, from the documents themselves: a packer that
        put a document elsewhere then shows as differing logits."""
        spans, start = [], 0
        for document in self.documents:
            spans.append((start, start + len(document)))
            start += len(document)
        return spans

    def image_grids(self) -> list:
        return [list(image.grid_thw) for document in self.documents for image in document.images]

    def batch(self, config: Config) -> Microbatch:
        """The packed row as megavl's loader collates it."""
        length = sum(len(d) for d in self.documents) + self.padding
        return _collate(self.documents, length, config)

    def document_batches(self, config: Config) -> list[Microbatch]:
        """Each document alone, unpadded, with its own images: what the Hugging Face model runs on."""
        return [_collate([document], len(document), config) for document in self.documents]


def _collate(documents: Sequence[Sample], length: int, config: Config) -> Microbatch:
    lm, merge = config.model.lm, config.model.vision.spatial_merge_size
    return collate_rows([pack_row(documents, length, lm.image_token_id, merge, positions=lm.image_positions)])


def document(config: Config, parts: Sequence[Union[int, ImagePatches]], text, key: str) -> Sample:
    """A sample of parts in order: an int n is n random text tokens (text from random_text),
    an image its image-pad tokens."""
    lm, merge = config.model.lm, config.model.vision.spatial_merge_size
    tokens, images = [], []
    for part in parts:
        if isinstance(part, int):
            tokens += text(part)
        else:
            images.append(part)
            tokens += [lm.image_token_id] * part.num_tokens(merge)
    n = len(tokens)
    return Sample(tokens=tokens, labels=[IGNORE_INDEX] * n, turn_ids=[0] * n, images=images, key=key)


def verification_inputs(config: Config, reserved: Iterable[int] = ()) -> list[VerificationInput]:
    """One document (text, image, text, image, text; no padding), and a packed row of three
    documents and trailing padding: the first with two images, the second text only, the third
    opening with the large image (the row's last image, its document's first)."""
    large, wide, tall = [image_to_model_input(image, config) for image in verification_images(config)]
    text = random_text(config, reserved)
    single = VerificationInput(ONE_DOCUMENT, [document(config, [5, large, 3, wide, 6], text, "verify")])
    text = random_text(config, reserved)
    packed = VerificationInput(PACKED_ROW, [
        document(config, [4, wide, 3, tall, 2], text, "verify-0"),
        document(config, [7], text, "verify-1"),
        document(config, [large, 6], text, "verify-2"),
    ], padding=PACKED_PADDING)
    return [single, packed]


def verification_batch(config: Config, reserved: Iterable[int] = ()) -> dict:
    """The one-document input as one packed row (no padding)."""
    return verification_inputs(config, reserved)[0].batch(config)


@torch.no_grad()
def megavl_logits(model, config: Config, batch: dict) -> torch.Tensor:
    """[batch, seq, vocab] logits, gathered over tensor-parallel ranks (last pipeline stage only)."""
    from megavl.models import inputs as model_inputs
    from megavl.platform.features import detect

    platform = detect()
    model.eval()
    logits = model_inputs.forward(model, model_inputs.to_device(batch, config, platform.device), config, platform,
                                  with_labels=False, gather_logits=True)
    return logits.float().cpu()


@torch.no_grad()
def hf_logits_and_positions(hf_model, batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face model's logits and the mrope positions it computes for the batch."""
    input_ids = batch["tokens"]
    # Marks image tokens; without it transformers falls back to 1D positions.
    mm_token_type_ids = (input_ids == image_token_id).int()
    positions, _ = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=batch["image_grid_thw"]
    )
    hf_model.eval()
    out = hf_model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=mm_token_type_ids,
    )
    return out.logits.float(), positions


def hf_document_outputs(hf_model, verification_input: VerificationInput,
                        config: Config) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logits, mrope positions) of the Hugging Face model on each document of the input alone."""
    outputs = [hf_logits_and_positions(hf_model, batch, config.model.lm.image_token_id)
               for batch in verification_input.document_batches(config)]
    return [logits for logits, _ in outputs], [positions for _, positions in outputs]


def compare(verification_input: VerificationInput, megavl: torch.Tensor, hf: Sequence[torch.Tensor],
            tolerance: float, megavl_positions: Optional[torch.Tensor] = None,
            hf_positions: Optional[Sequence[torch.Tensor]] = None,
            positions_compared: tuple[str, str] = InputCheck.positions_compared) -> InputCheck:
    """megavl's [1, row, vocab] logits (and [k, 1, row] positions) on the packed input against the
    Hugging Face model's [1, document, vocab] (and [k, 1, document]) on each document alone."""
    spans = verification_input.spans()
    if megavl.shape[:2] != (1, spans[-1][1] + verification_input.padding):
        raise ValueError(f"megavl logits of shape {tuple(megavl.shape)} for a row of "
                         f"{spans[-1][1] + verification_input.padding} tokens")
    diffs, scale, mismatches = [], 0.0, 0
    for i, ((start, end), theirs) in enumerate(zip(spans, hf, strict=True)):
        ours = megavl[:, start:end]
        if ours.shape != theirs.shape:
            raise ValueError(f"document {i}: logit shapes differ: megavl {tuple(ours.shape)}, "
                             f"Hugging Face {tuple(theirs.shape)}")
        diffs.append((ours - theirs).abs().max().item())
        scale = max(scale, theirs.abs().max().item())
        if hf_positions is not None:
            mismatches += int((megavl_positions[:, :, start:end].cpu() != hf_positions[i].cpu()).sum())
    return InputCheck(
        name=verification_input.name,
        document_tokens=[end - start for start, end in spans],
        padding=verification_input.padding,
        image_grids=verification_input.image_grids(),
        document_max_abs_diffs=diffs,
        max_rel_diff=largest(diffs) / scale if scale > 0 else float("inf"),
        tolerance=tolerance,
        position_mismatches=mismatches if hf_positions is not None else None,
        positions_compared=positions_compared,
    )


def load_megavl_for_verification(config: Config, megavl_dir: str):
    """The whole megavl model with the weights of megavl_dir."""
    from megavl.convert.megavl_model import build_single_process_model
    from megavl.training.checkpoint import load_model_weights

    model = build_single_process_model(config)
    # A tensor the checkpoint failed to restore would stay NaN and show in the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    load_model_weights(model, megavl_dir)
    return model


def verify_conversion(
    hf_dir: str,
    config: Config,
    architecture,
    megavl_dir: str,
    reserved: Iterable[int] = (),
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyResult:
    """Logits of the megavl checkpoint in megavl_dir against the Hugging Face model in
    hf_dir, both in fp32, on each of verification_inputs."""
    from megavl.convert.megavl_model import single_process_config

    fp32 = single_process_config(config, dtype="fp32")
    inputs = verification_inputs(fp32, reserved)
    batches = [verification_input.batch(fp32) for verification_input in inputs]
    megavl_model = load_megavl_for_verification(fp32, megavl_dir)
    ours = [megavl_logits(megavl_model, fp32, batch) for batch in batches]
    del megavl_model
    gc.collect()

    hf_model = architecture.model_class().from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    theirs = [hf_document_outputs(hf_model, verification_input, fp32) for verification_input in inputs]
    del hf_model
    gc.collect()
    checks = [
        compare(verification_input, logits, hf_logits, tolerance, batch["position_ids"], hf_positions)
        for verification_input, batch, logits, (hf_logits, hf_positions) in zip(inputs, batches, ours, theirs)
    ]
    return VerifyResult(inputs=checks, tolerance=tolerance)
