"""A VLM composed from a Hugging Face vision tower, a fresh projector and a Hugging Face text LM.

    tools/convert_from_hf.py --vision VISION_DIR --lm LM_DIR --adapter KIND [--adapter-args k=v ...]
                             [--vision-layer N] [--tokenizer DIR] --out CKPT

The tower (SigLIP, SigLIP2, CLIP, or that of a Qwen2-VL / Qwen2.5-VL folder:
megavl.convert.composed_sides) and the LM (Qwen2 / Qwen2.5, Qwen3, Llama, Qwen3-MoE) are copied
tensor by tensor; the projector starts from megavl's initial
values. The special tokens megavl's chat format and images need (megavl.data.tokenizer's
SPECIAL_TOKENS) that the LM's tokenizer lacks are added to it, and the embedding table (and an
untied output layer) grows to hold them: their rows start at the mean of the old tokens' rows,
rows added beyond the tokenizer (up to the next multiple of --vocab-multiple, which keeps the
table divisible by tensor-parallel sizes) are zero, and the LM's own rows are unchanged.

Images are fixed squares of the tower's pretrained size (the learned position table's grid) for
SigLIP and CLIP, and keep their own aspect ratio for SigLIP2 and a Qwen tower (within the
preprocessor's limits); they are numbered like text (model.lm.image_positions = sequential, 1-D
RoPE) and attended causally, as LLaVA and Idefics3 do. Each side is verified on its own: the tower's features against the
Hugging Face vision model, the LM's logits on text against the Hugging Face causal LM.

CKPT receives the weights (layout-free), megavl_config.yaml, tokenizer/ and composition.json
(what was composed from where, the tokens added, both source configs). Train it with
``--config CKPT/megavl_config.yaml --set checkpoint.pretrained=CKPT``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megavl.config import AdapterConfig, Config
from megavl.convert import qwen_lm
from megavl.convert.composed_sides import LMSide, VisionSide, lm_side_for, vision_side_for
from megavl.convert.errors import ConversionError
from megavl.convert.fields import dtype_name
from megavl.convert.files import CONFIG_NAME
from megavl.convert.hf_io import SafetensorsCheckpoint, check_new_folder, read_hf_config, read_preprocessor_config
from megavl.convert.importer import ImportResult, with_layout, write_converted_checkpoint
from megavl.convert.mapping import Fresh, MappingTable
from megavl.convert.verify import DEFAULT_TOLERANCE, reserved_token_ids, wants_verification
from megavl.convert.vocab_expansion import DEFAULT_VOCAB_MULTIPLE, TOKENIZER_DIR, add_tokens, expanded_vocab_size, new_rows
from megavl.data import tokenizer as tok

COMPOSITION_FILE = "composition.json"
ADAPTER_KINDS = ("merge_mlp", "pixel_shuffle", "mlp")
# --adapter-args keys: the patches merged per side, then model.adapter's fields.
ADAPTER_ARGS = {"factor": int, "norm": str, "bias": bool, "ffn_hidden_size": int}
EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"
VISION_CHECK = "vision tower (before the new projector)"


def parse_adapter(kind: str, args: Sequence[str]) -> tuple[AdapterConfig, int]:
    """model.adapter and the merge factor (model.vision.spatial_merge_size) from --adapter and
    --adapter-args key=value ...; factor defaults to 1 for mlp, 2 for the merging kinds."""
    if kind not in ADAPTER_KINDS:
        raise ConversionError(f"--adapter {kind!r}: valid kinds are {', '.join(ADAPTER_KINDS)}")
    values, problems = {}, []
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or key not in ADAPTER_ARGS:
            problems.append(f"--adapter-args {arg!r}: give key=value with key one of {', '.join(ADAPTER_ARGS)}")
            continue
        try:
            if ADAPTER_ARGS[key] is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                values[key] = text.lower() == "true"
            else:
                values[key] = ADAPTER_ARGS[key](text)
        except ValueError:
            problems.append(f"--adapter-args {arg!r}: {key} must be {ADAPTER_ARGS[key].__name__}")
    if problems:
        raise ConversionError("\n".join(problems))
    factor = values.pop("factor", 1 if kind == "mlp" else 2)
    return AdapterConfig(kind=kind, **values), factor


def _load_tokenizer(path: str, option: str):
    try:
        return tok.load_tokenizer(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConversionError(
            f"{option} {path}: {e}; the LM folder's tokenizer is used unless --tokenizer names another") from e


@dataclass
class Composition:
    """What the import composed, for composition.json and the caller."""

    vision: dict
    lm: dict
    adapter: dict
    added_tokens: dict[str, int]
    old_tokenizer_size: int
    old_vocab_size: int
    new_vocab_size: int


class ComposedTensors:
    """The tensors of both folders by the names the mapping tables use (the tower's under its
    prefix, all of the LM's), with the LM's embedding (and output) table grown to the new
    vocabulary: its rows kept, the new tokens' rows the mean of the old tokens' rows."""

    def __init__(self, vision_side: VisionSide, vision_dir: str, lm_dir: str, new_vocab: int, new_ids: list[int],
                 old_tokens: int):
        vision, lm = SafetensorsCheckpoint(vision_dir), SafetensorsCheckpoint(lm_dir)
        self._readers = {n: lm for n in lm.names()}
        self.prefix = vision_side.tower_prefix(vision.names())
        tower = [n for n in vision.names() if n.startswith(self.prefix)]
        clash = [n for n in tower if n in self._readers]
        if clash:
            raise ConversionError(f"{vision_dir} and {lm_dir} both hold {clash[0]}: give a vision folder "
                                  "and a language-model folder")
        self._readers.update({n: vision for n in tower})
        self.tower_names = tower
        self.new_vocab, self.new_ids, self.old_tokens = new_vocab, new_ids, old_tokens

    def names(self) -> list[str]:
        return list(self._readers)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._readers[name].shape(name)
        return (self.new_vocab, *shape[1:]) if name in (EMBEDDING, OUTPUT) else shape

    def get(self, name: str) -> torch.Tensor:
        value = self._readers[name].get(name)
        if name not in (EMBEDDING, OUTPUT):
            return value
        grown = value.new_zeros(self.shape(name))  # rows added beyond the tokenizer stay zero
        grown[: value.shape[0]] = value
        if self.new_ids:
            generator = torch.Generator().manual_seed(0)  # unused by the mean init, which is exact
            grown[self.new_ids] = new_rows(value, "mean", [[]] * len(self.new_ids), self.old_tokens, 0.02, generator)
        return grown

    def num_parameters(self) -> int:
        # The source models' sizes, before the table grows.
        return sum(math.prod(self._readers[n].shape(n)) for n in self._readers)


def compose_config(vision_side: VisionSide, hf_vision, lm_side: LMSide, hf_lm, adapter: AdapterConfig,
                   factor: int, vision_layer: Optional[int], tokenizer, new_vocab: int,
                   preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
    """The composed model's Config and notes for the user; raises ConversionError listing what megavl
    cannot reproduce of either side."""
    problems: list[str] = []
    config = Config()
    config.model.vision = vision_side.vision_config(hf_vision, vision_layer, factor)
    resolution_notes: list[str] = []
    vision_side.image_regime(config, hf_vision, preprocessor, problems, resolution_notes)
    config.model.adapter = adapter
    lm = lm_side.lm_config(hf_lm, problems)
    config.model.lm = dataclasses.replace(
        lm, vocab_size=new_vocab, image_token_id=tokenizer.convert_tokens_to_ids(tok.IMAGE_PAD),
        image_positions="sequential", image_attention="causal",
    )
    config.train.dtype, dtype_note = dtype_name(hf_lm)
    if problems:
        raise ConversionError(
            f"{lm_side.architecture} + {vision_side.kind} tower: megavl cannot compose this model:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    v, r = config.model.vision, config.data.resolution
    if r.mode == "native":
        resolution = (f"data.resolution: native, {r.min_pixels} to {r.max_pixels} pixels per image (the tower's "
                      "preprocessor)")
    else:
        px = int(math.isqrt(r.fixed_tokens)) * v.patch_size * v.spatial_merge_size
        resolution = (f"data.resolution: fixed {px} x {px} px images ({r.fixed_tokens} tokens each, padded to a "
                      "square), the tower's pretrained grid")
    layers = vision_side.layers_note(v, hf_vision)
    notes = [
        f"model.adapter.kind = {adapter.kind} starts fresh (megavl's initial values); train it first "
        "(train.stage = align) with the tower and the LM frozen",
        resolution,
        "model.lm.image_positions = sequential and image_attention = causal, as LLaVA and Idefics3 number and "
        "attend image tokens; bidirectional image attention is a --set away",
        layers,
        *resolution_notes,
    ]
    if dtype_note:
        notes.append(dtype_note)
    return config, notes


def _summary(side_name: str, folder: str, data: dict) -> dict:
    return {"kind": side_name, "folder": os.path.abspath(folder), "config": data}


@torch.no_grad()
def import_composed(
    vision_dir: str,
    lm_dir: str,
    adapter: str,
    out_dir: str,
    adapter_args: Sequence[str] = (),
    vision_layer: Optional[int] = None,
    tokenizer_dir: Optional[str] = None,
    tensor: int = 1,
    pipeline: int = 1,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Writes the VLM of vision_dir's tower, a fresh `adapter` and lm_dir's LM to out_dir.

    Raises ConversionError, naming the option, for anything that prevents it; the result's
    verification says whether both sides reproduce their Hugging Face models.
    """
    vision_json, lm_json = read_hf_config(vision_dir), read_hf_config(lm_dir)
    vision_side = vision_side_for(vision_json, f"--vision {os.path.join(vision_dir, CONFIG_NAME)}")
    lm_side = lm_side_for(lm_json, f"--lm {os.path.join(lm_dir, CONFIG_NAME)}")
    hf_vision = vision_side.hf_vision_config(vision_json, f"--vision {vision_dir}")
    hf_lm = lm_side.hf_config(lm_json, f"--lm {os.path.join(lm_dir, CONFIG_NAME)}")
    adapter_config, factor = parse_adapter(adapter, adapter_args)
    if vocab_multiple < 1:
        raise ConversionError(f"--vocab-multiple {vocab_multiple}: must be >= 1 (e.g. 128)")
    check_new_folder(out_dir, "--out")

    tokenizer_path = tokenizer_dir or lm_dir
    tokenizer = _load_tokenizer(tokenizer_path, "--tokenizer" if tokenizer_dir else "--lm")
    old_tokens = len(tokenizer)
    missing = [t for t in tok.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    added = add_tokens(tokenizer, missing, tokenizer_path)[1] if missing else {}
    new_vocab = expanded_vocab_size(hf_lm.vocab_size, len(tokenizer), vocab_multiple)
    if new_vocab % tensor:
        raise ConversionError(f"--vocab-multiple {vocab_multiple}: the vocabulary of {new_vocab} rows must be "
                              f"divisible by --tensor {tensor}; give a multiple of {tensor}")
    config, notes = compose_config(vision_side, hf_vision, lm_side, hf_lm, adapter_config, factor, vision_layer,
                                   tokenizer, new_vocab, read_preprocessor_config(vision_dir))
    config.data.tokenizer = os.path.abspath(os.path.join(out_dir, TOKENIZER_DIR))
    config = with_layout(config, tensor, pipeline)

    tensors = ComposedTensors(vision_side, vision_dir, lm_dir, new_vocab, list(added.values()), old_tokens)
    v, prefix = config.model.vision, tensors.prefix
    table = MappingTable(
        vision_side.mappings(v, prefix) + qwen_lm.lm_mappings(config) + [Fresh("adapter.")],
        ignorable_hf=tuple(vision_side.unused_tensors(tensors.tower_names, v, prefix))
        + qwen_lm.ignorable_hf_tensors(config),
    )
    num_parameters = tensors.num_parameters()
    log(f"import: {vision_side.kind} tower from {vision_dir} + {adapter} projector (new) + {lm_side.architecture} "
        f"from {lm_dir}: {num_parameters / 1e6:.1f}M parameters read")
    log(f"import: tokenizer {tokenizer_path}: {old_tokens} -> {len(tokenizer)} tokens"
        + (f" ({', '.join(f'{t} = {i}' for t, i in added.items())})" if added else " (it has every special token)")
        + f"; model.lm.vocab_size {hf_lm.vocab_size} -> {new_vocab}")
    for note in notes:
        log(f"  note: {note}")
    header = [
        f"Composed from the {vision_side.kind} tower of {os.path.abspath(vision_dir)}, a new {adapter} projector",
        f"and the {lm_side.architecture} of {os.path.abspath(lm_dir)} (see {COMPOSITION_FILE}).",
        f"Train it with --set checkpoint.pretrained={os.path.abspath(out_dir)}",
    ]
    written = write_converted_checkpoint(config, table, tensors, f"--vision {vision_dir} + --lm {lm_dir}",
                                         out_dir, header)
    tokenizer.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    composition = Composition(
        vision=_summary(vision_side.kind, vision_dir, vision_json),
        lm=_summary(lm_side.architecture, lm_dir, lm_json),
        adapter={"kind": adapter, "args": list(adapter_args)},
        added_tokens=added, old_tokenizer_size=old_tokens, old_vocab_size=hf_lm.vocab_size, new_vocab_size=new_vocab,
    )
    with open(os.path.join(out_dir, COMPOSITION_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(composition), f, indent=2)
        f.write("\n")
    log(f"import: wrote {written} tensors, {TOKENIZER_DIR}/ and {COMPOSITION_FILE} to {out_dir} "
        f"(layout-free; intended TP={tensor} PP={pipeline})")

    result = ImportResult(f"{vision_side.kind} + {adapter} + {lm_side.architecture}", config, out_dir,
                          num_parameters, notes, composition=composition)
    if wants_verification(verify, num_parameters):
        reserved = set(tokenizer.all_special_ids) | reserved_token_ids(lm_json)
        # The logits of the LM's own tokens: new tokens may take spare rows of its table.
        result.verification = verify_composed(vision_side, vision_dir, lm_side, lm_dir, config, out_dir,
                                              min(hf_lm.vocab_size, old_tokens), reserved, tolerance)
        log(result.verification.describe())
    return result


def verification_images(config: Config) -> list[torch.Tensor]:
    """Two fixed random [3, H, W] images: for a fixed-size tower its pretrained square and one a block
    taller (its position table interpolated); at native resolution one spanning several attention
    windows and a small wide one."""
    v, r = config.model.vision, config.data.resolution
    unit = v.patch_size * v.spatial_merge_size
    if r.mode == "native":
        from megavl.config.towers import tower_traits

        window = v.window_size if tower_traits(v).windows else 2 * unit
        sizes = ((window + unit, 2 * window), (2 * unit, 3 * unit))
    else:
        side = math.isqrt(r.fixed_tokens) * unit
        sizes = ((side, side), (side + unit, side))
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


@torch.no_grad()
def verify_composed(vision_side: VisionSide, vision_dir: str, lm_side: LMSide, lm_dir: str, config: Config,
                    megavl_dir: str, lm_tokens: int, reserved, tolerance: float = DEFAULT_TOLERANCE):
    """The checkpoint's tower against the Hugging Face vision model in vision_dir (its features, on
    verification_images) and its LM against the causal LM in lm_dir (the logits of the LM's own
    tokens, ids below lm_tokens, on a document and a packed row of text), each model in fp32 and
    one at a time."""
    from megavl.convert.megavl_model import single_process_config
    from megavl.convert.vision_towers import row_major_features
    from megavl.convert.verify import load_megavl_for_verification, megavl_logits
    from megavl.convert.verify_pairing import PairVerifyResult, check_text, text_inputs
    from megavl.data.image_patches import image_to_patches

    fp32 = single_process_config(config, dtype="fp32")
    lm_vocab = copy.deepcopy(fp32)
    lm_vocab.model.lm.vocab_size = lm_tokens  # text of the LM's own tokens
    inputs = text_inputs(lm_vocab, reserved)
    rows = [text_input.batch(fp32) for text_input in inputs]
    v = fp32.model.vision
    pictures = verification_images(fp32)
    patches, grids = zip(*(image_to_patches(p, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
                           for p in pictures))
    model = load_megavl_for_verification(fp32, megavl_dir)
    ours_text = [megavl_logits(model, fp32, row) for row in rows]
    model.eval()
    ours_images = row_major_features(model.vision(torch.cat(patches), torch.tensor(grids)).float(), grids,
                                     v.spatial_merge_size)
    del model
    gc.collect()

    lm = lm_side.load_reference(lm_dir)
    text_checks = check_text(lm, inputs, rows, ours_text, fp32, tolerance,
                             ("positions", f"{lm_side.architecture}'s 0, 1, ..."), columns=lm_tokens)
    del lm
    gc.collect()
    tower = vision_side.load_reference(vision_dir)
    diffs = []
    for mine, picture in zip(ours_images, pictures):
        theirs = vision_side.reference_features(tower, picture, v)
        if mine.shape != theirs.shape:
            raise ConversionError(f"vision features of shape {tuple(mine.shape)}, Hugging Face's "
                                  f"{tuple(theirs.shape)}: the tower was not reproduced")
        diffs.append((mine - theirs).abs().max().item())
    del tower
    gc.collect()
    return PairVerifyResult(text=text_checks, vision_max_abs_diff=max(diffs), tolerance=tolerance,
                            image_grids=[list(g) for g in grids], vision_label=VISION_CHECK)
