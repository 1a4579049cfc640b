"""Answers from the model: a batched prefill with the training mask, then cached causal decoding.

The KV cache is megatron-core's: a ``StaticInferenceContext`` passed down to its
``SelfAttention``, which stores each layer's keys and values and hands the cached prefix
to megavl's core attention. The loop around it is megavl's own, because megatron's
engines (``StaticInferenceEngine`` with ``TextGenerationController`` and the GPT
inference wrapper) build their own inputs: 1D positions, a causal mask, token
embeddings only. A VLM prompt needs the image embeddings spliced in, multimodal RoPE
positions, and the training mask (image tokens attending to each other both ways),
all of which ``models.inputs``/``attention.mask`` already define; here they are
reused for the prefill and, row by row, for each decoded token.

Prompts of different lengths are padded on the left, so every row's prompt ends at the
same cache position; padding is a document of its own that nothing attends to. Under
tensor parallelism every rank of a group runs the same prompts and draws the same
tokens (the logits are gathered, and sampling uses a generator seeded alike on every
rank). Where ranks hold different prompts (data parallel, expert parallel), all ranks
decode in lockstep until all are done, because MoE layers exchange tokens across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megavl.attention.mask import PAD_DOCUMENT_ID, TEXT_IMAGE_ID, materialize_rows, vlm_mask_mod
from megavl.config import Config
from megavl.data.batch import Sample, pack_row
from megavl.data.conversation import pad_token_id, special_token_id
from megavl.data.tokenizer import ENDOFTEXT, IM_END


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")


def check_generation_layout(config: Config) -> None:
    """Generation runs the model whole along the pipeline and the sequence: refuse the layouts
    it cannot (one decoded token cannot be split over sequence-parallel ranks)."""
    p = config.parallel
    if p.pipeline != 1:
        raise ValueError(f"parallel.pipeline = {p.pipeline}: generation runs on one pipeline stage "
                         "(load the checkpoint with parallel.pipeline = 1; checkpoints reshard)")
    if p.sequence_parallel:
        raise ValueError("parallel.sequence_parallel = true: generation decodes one token at a time, "
                         "which cannot be split along the sequence; load with sequence_parallel = false")


def _sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    """[b, V] logits -> [b] token ids."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= settings.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(logits.device)


class Generator:
    """Generates answers for prompts (Samples from SampleEncoder.encode(..., prompt=True))."""

    def __init__(self, model, config: Config, platform, vocab_size: int, pad_id: int, stop_ids: Sequence[int]):
        """vocab_size: the tokens that may be drawn (the tokenizer's; the model's table may be
        padded beyond it); stop_ids: tokens that end an answer."""
        check_generation_layout(config)
        self.model = model
        self.config = config
        self.platform = platform
        self.vocab = vocab_size
        self.pad = pad_id
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.image_token = config.model.lm.image_token_id
        self.merge = config.model.vision.spatial_merge_size

    @classmethod
    def for_tokenizer(cls, model, config: Config, platform, tokenizer) -> "Generator":
        """Answers end at <|im_end|> (the chat format's end of turn) or <|endoftext|>."""
        stops = [special_token_id(tokenizer, IM_END), special_token_id(tokenizer, ENDOFTEXT)]
        return cls(model, config, platform, len(tokenizer), pad_token_id(tokenizer), stops)

    def _batch(self, prompts: Sequence[Sample], total: int) -> dict:
        """Id tensors for the whole generation, [b, total]: each prompt packed as training packs a
        document (pack_row), padded on the left to end where the others do."""
        b, longest = len(prompts), max(len(p) for p in prompts)
        batch = {
            "tokens": torch.full((b, total), self.pad, dtype=torch.long),
            "document_ids": torch.full((b, total), PAD_DOCUMENT_ID, dtype=torch.long),
            "image_ids": torch.full((b, total), TEXT_IMAGE_ID, dtype=torch.long),
            "turn_ids": torch.zeros((b, total), dtype=torch.long),
            "position_ids": torch.zeros((3, b, total), dtype=torch.long),
        }
        images = []
        for row, prompt in enumerate(prompts):
            packed = pack_row([prompt], len(prompt), self.image_token, self.merge, self.pad,
                              self.config.model.lm.image_positions)
            start = longest - len(prompt)
            for key in ("tokens", "document_ids", "image_ids", "turn_ids"):
                batch[key][row, start:longest] = packed[key]
            batch["document_ids"][row, longest:] = 0  # the answer belongs to the prompt's document
            positions = packed["position_ids"]
            batch["position_ids"][:, row, start:longest] = positions
            # Generated text continues from the largest position, as text after an image does.
            following = int(positions.max()) + 1 + torch.arange(total - longest)
            batch["position_ids"][:, row, longest:] = following
            images += packed["images"]
        batch["pixel_values"] = torch.cat([im.pixel_values for im in images]) if images else None
        batch["image_grid_thw"] = (torch.tensor([im.grid_thw for im in images], dtype=torch.long)
                                   if images else None)
        return batch

    def _logits(self, batch: dict, mask_mod, start: int, length: int, context) -> torch.Tensor:
        """Last-position logits [b, V] of running tokens start .. start + length against the cache;
        they attend by mask_mod's rows start .. start + length."""
        end = start + length
        positions = batch["position_ids"][:, :, :end]  # megatron slices the rotary angles by cache position
        if self.config.model.lm.rope == "1d":
            positions = positions[0]
        first = start == 0
        logits = self.model(
            batch["tokens"][:, start:end],
            positions,
            materialize_rows(mask_mod, batch["tokens"].shape[0], start, length, end, self.platform.attention_backend),
            pixel_values=batch["pixel_values"] if first else None,
            image_grid_thw=batch["image_grid_thw"] if first else None,
            gather_logits=True,
            inference_context=context,
        )
        context.sequence_len_offset += length
        return logits[:, -1, : self.vocab].float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sample], settings: Optional[GenerationSettings] = None,
                 step_logits: Optional[list] = None) -> list[list[int]]:
        """The new tokens of each prompt, up to and without the end-of-turn token. ``step_logits``,
        when given a list, receives the [b, V] logits each token was drawn from."""
        from megatron.core.inference.contexts import StaticInferenceContext

        settings = settings or GenerationSettings()
        if not prompts:
            raise ValueError("no prompts to generate for")
        device = self.platform.device
        longest = max(len(p) for p in prompts)
        total = longest + settings.max_new_tokens
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self._batch(prompts, total).items()}
        # The attention rule over the whole generation, built once; each step takes its rows of it.
        bidirectional = self.config.model.lm.image_attention == "bidirectional"
        mask_mod = vlm_mask_mod(batch["document_ids"], batch["image_ids"], batch["turn_ids"], bidirectional)
        context = StaticInferenceContext(len(prompts), total)
        generator = torch.Generator().manual_seed(settings.seed)
        stop = self.stop.to(device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        new_tokens = []
        self.model.eval()
        logits = self._logits(batch, mask_mod, 0, longest, context)
        context.enable_decode_mode()
        for step in range(settings.max_new_tokens):
            if step_logits is not None:
                step_logits.append(logits.cpu())
            token = _sample(logits, settings, generator)
            token = torch.where(done, torch.full_like(token, self.pad), token)
            new_tokens.append(token)
            done |= torch.isin(token, stop)
            position = longest + step
            if step + 1 == settings.max_new_tokens or _all_done(done):
                break
            batch["tokens"][:, position] = token
            logits = self._logits(batch, mask_mod, position, 1, context)
        generated = torch.stack(new_tokens, dim=1).tolist()
        return [_until_stop(row, set(self.stop.tolist())) for row in generated]


def _all_done(done: torch.Tensor) -> bool:
    """Whether every row of every rank has finished (ranks decode in lockstep: MoE layers
    exchange tokens between them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(done.all())
    from megavl.platform.distributed import collective_device

    flag = done.all().to(device=collective_device(), dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[:i]
    return tokens
