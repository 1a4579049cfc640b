"""A tiny random Hugging Face Qwen3-MoE language model for the converter tests.

Its hidden size (64) differs from twice the expert width (40) and twice the
dense MLP width (96), so gate/up/down layouts cannot be confused. Layer 0 is
dense (mlp_only_layers), the others sparse; every weight and norm is random.
Its hidden size equals the tiny Qwen2.5-VL's (convert_tiny_models), whose
vision tower it is paired with.
"""

from __future__ import annotations

import torch

from workers.convert_tiny_models import randomize


def qwen3_moe_config(tie: bool = False, norm_topk_prob: bool = True, **extra):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, mlp_only_layers=[0],
        rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
        **extra,
    )


def save_tiny_qwen3_moe(folder: str, seed: int = 1, **config_fields):
    """Builds, randomises and saves (safetensors) a tiny Qwen3-MoE LM; returns it in eval mode."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(qwen3_moe_config(**config_fields))
    randomize(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


def _main() -> None:
    import argparse

    from workers.convert_tiny_models import save_tiny_model

    parser = argparse.ArgumentParser(description="save the tiny Qwen3-MoE LM and the tiny Qwen2.5-VL")
    parser.add_argument("--lm", required=True)
    parser.add_argument("--vision", required=True)
    args = parser.parse_args()
    save_tiny_qwen3_moe(args.lm)
    save_tiny_model("qwen2_5_vl", args.vision)


if __name__ == "__main__":
    torch.manual_seed(0)
    _main()
