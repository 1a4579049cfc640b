"""The vision-language model: vision encoder -> adapter -> megatron-core GPT decoder.

Pipeline-aware: the first pipeline stage holds the vision encoder, the adapter
and the token embeddings; every stage holds its share of LM layers; the last
stage holds the output layer. Image embeddings replace the embeddings of the
image-pad tokens, in order.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megavl.config import Config
from megavl.models.adapter import build_adapter
from megavl.models.inputs import check_image_tokens
from megavl.models.interleaved_mrope import InterleavedMultimodalRotaryEmbedding
from megavl.models.modality import vision_tokens
from megavl.models.recompute import recompute_layers
from megavl.models.specs import layer_spec, lm_block_spec
from megavl.config.towers import tower_traits
from megavl.models.transformer_configs import (
    lm_transformer_config, vision_transformer_config, window_stage_transformer_config,
)
from megavl.models.vision import VisionEncoder
from megavl.models.vision_lora import VisionLoRASettings
from megavl.platform.features import Platform, detect, layer_backend_for


class VisionLanguageModel(MegatronModule):
    def __init__(
        self,
        config: Config,
        pre_process: bool = True,
        post_process: bool = True,
        platform: Optional[Platform] = None,
    ):
        platform = platform or detect()
        lm_config = lm_transformer_config(config, fused_kernels=platform.cuda)
        super().__init__(config=lm_config)
        lm = config.model.lm
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = lm.image_token_id
        self.share_embeddings_and_output_weights = lm.tie_embeddings
        self.model_type = ModelType.encoder_or_decoder

        layers, _ = layer_backend_for(config, platform)
        if pre_process:
            vision_config = vision_transformer_config(config, fused_kernels=platform.cuda)
            vision = config.model.vision
            window_config = (window_stage_transformer_config(config, fused_kernels=platform.cuda)
                             if tower_traits(vision).compresses else None)
            self.vision = VisionEncoder(
                vision_config,
                vision,
                layer_spec(layers, platform.attention_backend),
                platform.attention_backend,
                window_config=window_config,
            )
            self.adapter = build_adapter(config, vision_config)

        self.language_model = GPTModel(
            lm_config,
            lm_block_spec(
                lm_config, layers, platform.attention_backend, lm.qk_layernorm,
                vision_lora=VisionLoRASettings.from_config(lm.vision_lora),
            ),
            vocab_size=lm.vocab_size,
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=lm.tie_embeddings,
            position_embedding_type="mrope" if lm.rope == "mrope" else "rope",
            rotary_base=lm.rope_theta,
            rope_scaling=lm.rope_scaling_factor is not None,
            rope_scaling_factor=lm.rope_scaling_factor or 1.0,
            # Image embeddings are spliced in before the sequence is split for SP.
            scatter_embedding_sequence_parallel=False,
        )
        self._set_up_recompute(config)
        if lm.rope == "mrope" and lm.mrope_layout == "interleaved":
            # Qwen3-VL's layout of the frequencies over t/h/w; the same angles' shape, so GPTModel takes it as it is.
            old = self.language_model.rotary_pos_emb
            self.language_model.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding(
                kv_channels=lm_config.kv_channels, rotary_percent=1.0, rotary_interleaved=lm_config.rotary_interleaved,
                seq_len_interpolation_factor=old.seq_len_interpolation_factor, rotary_base=lm.rope_theta,
            )

    def _set_up_recompute(self, config: Config) -> None:
        """perf.recompute_*: the chosen layers of this stage recompute their activations in the backward."""
        perf = config.perf
        if perf.recompute_lm == "full":
            layers = list(self.language_model.decoder.layers)
            recompute_layers(layers[: perf.recompute_lm_layers or len(layers)])
        if perf.recompute_vision == "full" and self.pre_process:
            recompute_layers([*self.vision.layers, *getattr(self.vision, "window_layers", [])])

    # -- pipeline plumbing: megatron's schedules and finalize_model_grads call these --
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask,
        labels: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        gather_logits: bool = False,
        inference_context=None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] when labels are given (last stage), else logits or hidden states.

        labels must be valid token ids; positions without a target are masked by
        the caller's loss mask, not here. inference_context: megatron's KV cache for
        generation (megavl/eval/generation.py); tokens are then the ones not yet cached.
        """
        decoder_input = self._embed(tokens, pixel_values, image_grid_thw) if self.pre_process else None
        with vision_tokens(tokens == self.image_token_id):
            return self.language_model(
                input_ids=tokens,
                position_ids=position_ids,
                attention_mask=attention_mask,
                decoder_input=decoder_input,
                labels=labels,
                runtime_gather_output=gather_logits or None,
                inference_context=inference_context,
            )

    def _tower_trains(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for module in (self.vision, self.adapter) for p in module.parameters())

    def _blank_image_term(self, hidden: torch.Tensor) -> torch.Tensor:
        """Zero, computed from the tower and adapter on one blank image, for a microbatch without images.

        Every trainable parameter then gets a gradient (of zeros) in every microbatch, as
        megatron's overlapped gradient reduce (perf.overlap_grad_reduce) needs: a bucket is
        reduced once all its parameters' gradients are in, and a rank whose last microbatch
        left the tower out would never reduce the tower's buckets while the other ranks wait.
        The image is the smallest the tower takes (2 x 2 merged tokens), so it costs little.
        """
        v = self.vision.vision
        side = 2 * v.spatial_merge_size
        grid = torch.tensor([[1, side, side]])  # on the host, as the tower reads grids there
        pixels = hidden.new_zeros(side * side, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
        return self.adapter(self.vision(pixels, grid)).sum().to(hidden.dtype) * 0.0

    def _embed(self, tokens, pixel_values, image_grid_thw) -> torch.Tensor:
        embedding = self.language_model.embedding
        hidden = embedding.word_embeddings(tokens)  # [b, s, h], whole on every TP rank
        image_slots = tokens == self.image_token_id
        has_images = image_grid_thw is not None and len(image_grid_thw) > 0
        if tokens.device.type == "cpu":
            # On an accelerator this would read the tokens back; models.inputs.to_device checked
            # the host copy before moving it.
            check_image_tokens(tokens, image_grid_thw, self.image_token_id, self.vision.vision.spatial_merge_size)
        if has_images:
            # A vision tower frozen entirely builds no autograd graph and keeps no
            # activations: none of its inputs or parameters requires a gradient.
            image_embeds = self.adapter(self.vision(pixel_values, image_grid_thw))
            hidden = hidden.masked_scatter(image_slots[..., None], image_embeds.to(hidden.dtype))
        elif self._tower_trains():
            hidden = hidden + self._blank_image_term(hidden)
        hidden = hidden.transpose(0, 1).contiguous()  # megatron's [s, b, h]
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return embedding.embedding_dropout(hidden)
        return embedding.embedding_dropout(hidden)
