"""A VLM composed from a Hugging Face vision tower and a text-only Hugging Face LM with a new projector
(tools/convert_from_hf.py --vision --lm --adapter): each side reproduces its Hugging Face model, the
tokenizer and the embedding table gain the special tokens they lack, inputs megavl cannot compose are
refused with the option named, and the composed checkpoint trains with checkpoint.pretrained.

Every Hugging Face model is tiny, random (norms and biases included) and built offline. Hidden sizes
differ from twice the MLP widths so that swapped layouts cannot agree."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import NO_TASK_EVAL, tiny_tokenizer
from trainer_runs import _metrics, _overrides, _train, data_dir  # noqa: F401 (data_dir is a fixture)
from workers.convert_tiny_models import quiet, randomize, read_all_tensors, save_tiny_model

TOLERANCE = 1e-4
CORPUS = ["a small picture of three red squares", "how many circles are there", "the answer is 4"]


def save_vision(kind: str, folder: str, whole_model: bool = False) -> None:
    """A tiny SigLIP (56 px, 4 x 4 patches) or CLIP (42 px, 3 x 3) tower; whole_model: inside a
    SiglipModel / CLIPModel with its text tower, as image-text checkpoints ship. A Qwen kind is a
    whole tiny Qwen2-VL / Qwen2.5-VL model (its tower, merger and LM) with Qwen's preprocessor."""
    import transformers

    if kind.startswith("qwen"):
        save_tiny_model(kind, folder)
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump({"size": {"shortest_edge": 3136, "longest_edge": 50176}, "patch_size": 14,
                       "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.25, 0.25, 0.25]}, f)
        return
    if kind == "siglip2":
        # A 4 x 4 position table of 16 px patches, resized per image; up to 64 patches an image.
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
            hidden_size=48, intermediate_size=80, num_attention_heads=4, num_hidden_layers=2, patch_size=16,
            num_patches=16))
        randomize(model, seed=3)
        model.save_pretrained(folder)
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump({"max_num_patches": 64, "patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f)
        return

    common = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, patch_size=14)
    if kind == "siglip":
        vision = dict(common, num_hidden_layers=2, image_size=56, hidden_act="gelu_pytorch_tanh")
        mean = std = [0.5, 0.5, 0.5]
    else:
        vision = dict(common, num_hidden_layers=3, image_size=42, hidden_act="quick_gelu")
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    prefix = "Siglip" if kind == "siglip" else "CLIP"
    if whole_model:
        text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = getattr(transformers, f"{prefix}Model")(
            getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text))
    else:
        model = getattr(transformers, f"{prefix}VisionModel")(getattr(transformers, f"{prefix}VisionConfig")(**vision))
    randomize(model, seed=3)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": mean, "image_std": std}, f)


def lm_config(kind: str, vocab_size: int, tie: bool, rope=None):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  rope_parameters=rope or dict(rope_type="default", rope_theta=10000.0), bos_token_id=0, eos_token_id=1,
                  pad_token_id=1)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    # Qwen3's heads are set apart from hidden_size / num_attention_heads (16 here), as in Qwen3-0.6B.
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=24)
    return transformers.Qwen3MoeConfig(**common, head_dim=24, moe_intermediate_size=40, num_experts=4,
                                       num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])


def save_lm(kind: str, folder: str, tokenizer, vocab_size: int, tie: bool, rope=None) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(lm_config(kind, vocab_size, tie, rope))
    randomize(model, seed=5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def plain_tokenizer():
    """A Llama-style tokenizer without any of megavl's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


# (vision kind, whole image-text model, LM kind, tied, adapter, adapter args, tokenizer with megavl's tokens)
CASES = {
    "siglip+pixel_shuffle+llama": ("siglip", False, "llama", True, "pixel_shuffle", ["factor=2", "norm=after"], False),
    "clip+mlp+qwen2": ("clip", True, "qwen2", False, "mlp", [], True),
    "siglip+merge_mlp+qwen3": ("siglip", True, "qwen3", False, "merge_mlp", ["factor=2"], False),
    "clip+pixel_shuffle+qwen3_moe": ("clip", False, "qwen3_moe", False, "pixel_shuffle", ["factor=1", "bias=false"],
                                     True),
    # SigLIP2 at native aspect ratios (its table resized bilinearly per image).
    "siglip2+pixel_shuffle+qwen2": ("siglip2", False, "qwen2", False, "pixel_shuffle", ["factor=2", "norm=after"],
                                    True),
    # The towers of whole Qwen VLMs (window attention in Qwen2.5-VL's), at native resolution.
    "qwen2_5_vl+merge_mlp+llama": ("qwen2_5_vl", True, "llama", True, "merge_mlp", ["factor=2"], False),
    "qwen2_vl+pixel_shuffle+qwen3": ("qwen2_vl", True, "qwen3", False, "pixel_shuffle", ["factor=2", "norm=after"],
                                     True),
}


@pytest.fixture(scope="module")
def composed(megatron_world, tmp_path_factory):
    """Each case's Hugging Face folders and its import (verified)."""
    from megavl.convert.composed import import_composed

    results = {}
    for name, (vision, whole, lm, tie, adapter, args, has_tokens) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        save_vision(vision, str(root / "vision"), whole_model=whole)
        tokenizer = tiny_tokenizer(CORPUS) if has_tokens else plain_tokenizer()
        # A table with spare rows beyond the tokenizer (Qwen's) where it already has the tokens.
        vocab = len(tokenizer) + (20 if has_tokens else 0)
        save_lm(lm, str(root / "lm"), tokenizer, vocab, tie)
        result = import_composed(str(root / "vision"), str(root / "lm"), adapter, str(root / "out"),
                                 adapter_args=args, verify=True, log=quiet)
        results[name] = (root, result)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_each_side_reproduces_its_hugging_face_model(composed, case):
    root, result = composed[case]
    check = result.verification
    assert check.ok, check.describe()
    assert check.text_max_abs_diff <= TOLERANCE and check.vision_max_abs_diff <= TOLERANCE, check.describe()
    assert [c.name for c in check.text] == ["one document", "packed row"]
    assert "vision tower (before the new projector) OK" in check.describe()
    assert f"positions match {result.architecture.split(' + ')[-1]}'s 0, 1, ..." in check.describe()
    vision_kind, _, lm_kind, tie, adapter, _, _ = CASES[case]
    config = result.config
    # SigLIP2 is megavl's siglip tower with its own position interpolation.
    assert (config.model.vision.kind, config.model.adapter.kind) == (vision_kind.replace("siglip2", "siglip"), adapter)
    lm = config.model.lm
    assert lm.rope == "1d" and lm.image_positions == "sequential" and lm.image_attention == "causal"
    assert lm.tie_embeddings == tie and lm.qkv_bias == (lm_kind == "qwen2")
    assert lm.qk_layernorm == lm_kind.startswith("qwen3") and (lm.moe.num_experts == 4) == (lm_kind == "qwen3_moe")
    # Qwen3's 24-wide heads are kept; the others' derived width stays null.
    assert lm.head_dim == (24 if lm_kind.startswith("qwen3") else None)


def test_a_qwen_tower_keeps_native_resolution_and_leaves_its_merger_and_lm(composed):
    from megavl.convert.megavl_model import build_single_process_model, model_tensors
    from megavl.training.checkpoint import load_model_weights

    root, result = composed["qwen2_5_vl+merge_mlp+llama"]
    config = result.config
    v, r = config.model.vision, config.data.resolution
    assert (v.kind, v.num_layers, v.full_attention_layers, v.window_size) == ("qwen2_5_vl", 3, [2], 56)
    # The preprocessor's pixel limits and statistics.
    assert (r.mode, r.min_pixels, r.max_pixels) == ("native", 3136, 50176)
    assert (v.image_mean, v.image_std) == ([0.5] * 3, [0.25] * 3)
    model = build_single_process_model(config)
    load_model_weights(model, str(root / "out"))
    ours = model_tensors(model)
    hf = read_all_tensors(root / "vision")
    # The tower is the folder's; the projector is new, not the merger.
    assert torch.equal(ours["vision.layers.1.self_attention.linear_proj.weight"], hf["model.visual.blocks.1.attn.proj.weight"]
                       if "model.visual.blocks.1.attn.proj.weight" in hf else hf["visual.blocks.1.attn.proj.weight"])
    merger = [t for n, t in hf.items() if ".merger." in n]
    assert not any(t.shape == a.shape and torch.equal(t, a) for t in merger for n, a in ours.items()
                   if n.startswith("adapter."))


def test_siglip2_keeps_native_aspect_ratios_and_resizes_its_table_bilinearly(composed):
    from megavl.convert.composed import verification_images

    root, result = composed["siglip2+pixel_shuffle+qwen2"]
    config = result.config
    v, r = config.model.vision, config.data.resolution
    assert (v.kind, v.image_size, v.position_interpolation, v.post_norm) == ("siglip", 64, "bilinear_antialias", True)
    assert (r.mode, r.max_pixels) == ("native", 64 * 16 * 16)
    # The features were compared on grids other than the 4 x 4 table, wider than tall.
    grids = result.verification.image_grids
    assert [1, 4, 4] not in grids and any(h != w for _, h, w in grids), grids
    assert [tuple(p.shape[1:]) for p in verification_images(config)] == [(96, 128), (64, 96)]
    # SigLIP's bicubic resizing of the same table gives other features: the check tells them apart.
    import dataclasses

    from megavl.convert.composed import verify_composed
    from megavl.convert.composed_sides import LM_SIDES, VISION_SIDES

    bicubic = dataclasses.replace(config, model=dataclasses.replace(
        config.model, vision=dataclasses.replace(v, position_interpolation="bicubic")))
    check = verify_composed(VISION_SIDES["siglip2_vision_model"], str(root / "vision"), LM_SIDES["Qwen2ForCausalLM"],
                            str(root / "lm"), bicubic, str(root / "out"), 100, set())
    assert check.vision_max_abs_diff > 10 * TOLERANCE, check.describe()


def test_a_qwen_tower_refuses_another_merge_factor(composed, tmp_path):
    from megavl.convert.composed import import_composed
    from megavl.convert.errors import ConversionError

    root = composed["qwen2_5_vl+merge_mlp+llama"][0]
    with pytest.raises(ConversionError, match=r"factor=1: the qwen2_5_vl tower orders its patches .* valid: factor=2"):
        import_composed(str(root / "vision"), str(root / "lm"), "mlp", str(tmp_path / "out"), log=quiet)
    with pytest.raises(ConversionError, match="--vision-layer -2: a qwen2_5_vl tower is read at its last layer"):
        import_composed(str(root / "vision"), str(root / "lm"), "merge_mlp", str(tmp_path / "out"),
                        adapter_args=["factor=2"], vision_layer=-2, log=quiet)


def test_the_tower_reads_the_feature_layer_and_the_pixel_statistics_of_its_kind(composed):
    siglip = composed["siglip+pixel_shuffle+llama"][1].config
    clip = composed["clip+mlp+qwen2"][1].config
    # SigLIP: every layer and post_layernorm (SiQ-VL, Idefics3); CLIP: layer -2 without it (LLaVA).
    assert (siglip.model.vision.num_layers, siglip.model.vision.post_norm) == (2, True)
    assert (clip.model.vision.num_layers, clip.model.vision.post_norm) == (2, False)
    # SigLIP's 0.5 is its kind's own; CLIP's statistics too, so neither config names them.
    assert siglip.model.vision.image_mean is None and clip.model.vision.image_mean is None
    # Fixed squares of the pretrained grid: 4 x 4 patches shuffled 2 x 2, 3 x 3 patches one by one.
    assert (siglip.data.resolution.mode, siglip.data.resolution.fixed_tokens) == ("fixed", 4)
    assert (clip.data.resolution.mode, clip.data.resolution.fixed_tokens) == ("fixed", 9)


def test_missing_special_tokens_are_added_and_the_table_grows(composed):
    from megavl.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids

    root, result = composed["siglip+pixel_shuffle+llama"]
    out = root / "out"
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    composition = json.loads((out / "composition.json").read_text())
    old = composition["old_tokenizer_size"]
    assert composition["added_tokens"] == {t: old + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert len(tokenizer) == old + len(SPECIAL_TOKENS)
    lm = result.config.model.lm
    assert lm.vocab_size == composition["new_vocab_size"] == 384  # 312 tokens -> the next multiple of 128
    assert lm.image_token_id == special_token_ids(tokenizer)["image_pad"]
    assert result.config.data.tokenizer == str(out / "tokenizer")

    from megavl.convert.megavl_model import build_single_process_model, model_tensors
    from megavl.training.checkpoint import load_model_weights

    model = build_single_process_model(result.config)
    load_model_weights(model, str(out))
    embedding = model_tensors(model)["language_model.embedding.word_embeddings.weight"]
    hf = read_all_tensors(root / "lm")["model.embed_tokens.weight"]
    assert torch.equal(embedding[:old], hf)
    new = embedding[old:old + len(SPECIAL_TOKENS)]
    assert torch.allclose(new, hf.double().mean(0).float().expand_as(new))
    assert torch.equal(embedding[len(tokenizer):], torch.zeros_like(embedding[len(tokenizer):]))


def test_tokens_that_fit_in_spare_rows_keep_the_table(composed):
    """The tokenizer lacks only the point tokens; Qwen-style spare rows beyond it hold them."""
    from megavl.convert.megavl_model import build_single_process_model, model_tensors
    from megavl.training.checkpoint import load_model_weights

    root, result = composed["clip+mlp+qwen2"]
    composition = json.loads((root / "out" / "composition.json").read_text())
    old = composition["old_tokenizer_size"]
    assert composition["added_tokens"] == {"<|point_start|>": old, "<|point_end|>": old + 1}
    assert result.config.model.lm.vocab_size == composition["old_vocab_size"] == old + 20
    assert result.config.model.lm.image_token_id == 3  # megavl's tokenizer layout
    model = build_single_process_model(result.config)
    load_model_weights(model, str(root / "out"))
    hf = read_all_tensors(root / "lm")
    for ours, theirs in (("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                         ("language_model.output_layer.weight", "lm_head.weight")):
        table, source = model_tensors(model)[ours], hf[theirs]
        assert torch.equal(table[:old], source[:old]) and torch.equal(table[old + 2:], source[old + 2:])
        assert torch.allclose(table[old:old + 2], source[:old].double().mean(0).float().expand(2, -1))


def test_the_projector_is_new_and_the_composition_splits_for_tensor_parallelism(composed):
    import dataclasses

    from megavl.config import validate
    from megavl.convert.megavl_model import build_single_process_model, model_tensors
    from megavl.training.checkpoint import load_model_weights

    root, result = composed["siglip+merge_mlp+qwen3"]
    config = result.config
    assert "starts fresh" in " ".join(result.notes)
    model = build_single_process_model(config)
    load_model_weights(model, str(root / "out"))
    adapter = {n: t for n, t in model_tensors(model).items() if n.startswith("adapter.")}
    hf = list(read_all_tensors(root / "vision").values()) + list(read_all_tensors(root / "lm").values())
    weights = [t for n, t in adapter.items() if n.endswith("weight") and t.dim() == 2]
    # merge_mlp: 48 x 2 x 2 merged patch width in, the LM's 64 out; megavl's initial values, no copy.
    assert sorted(w.shape[1] for w in weights) == [192, 192]
    assert all(w.std() > 0 and not any(w.shape == h.shape and torch.equal(w, h) for h in hf) for w in weights)
    two = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tensor=2))
    validate(two, world_size=2)


def test_the_command_refuses_what_it_cannot_compose(composed, tmp_path, capsys):
    import re

    from tools.convert_from_hf import main

    root = composed["siglip+pixel_shuffle+llama"][0]
    vision, lm = str(root / "vision"), str(root / "lm")
    cases = [
        # The 4 x 4 patch grid does not split into 3 x 3 blocks.
        (["--vision", vision, "--lm", lm, "--adapter", "pixel_shuffle", "--adapter-args", "factor=3"],
         "factor=3: the tower's 4 x 4 patch grid .* valid factors: 1, 2, 4"),
        (["--vision", vision, "--lm", lm, "--adapter", "mlp", "--adapter-args", "depth=2"],
         "'depth=2': give key=value with key one of factor, norm, bias, ffn_hidden_size"),
        (["--vision", vision, "--lm", lm, "--adapter", "mlp", "--vision-layer", "-5"],
         "--vision-layer -5: the tower has 2 layers"),
        # The folders the other way round.
        (["--vision", lm, "--lm", vision, "--adapter", "mlp"], "model_type = 'llama' is not a vision tower"),
        (["--vision", vision, "--lm", lm, "--adapter", "mlp", "--tokenizer", str(tmp_path / "none")],
         "--tokenizer .*none.* does not exist"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert not (tmp_path / "out").exists()
    for args, message in ((["--hf", lm, "--vision", vision], "give one or the other"),
                          (["--vision", vision, "--lm", lm], "--vision, --lm and --adapter together")):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--out", str(tmp_path / "o")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_lm_megavl_cannot_reproduce_is_refused_with_the_field(megatron_world, tmp_path, composed):
    from megavl.convert.composed import import_composed
    from megavl.convert.errors import ConversionError

    root = composed["siglip+pixel_shuffle+llama"][0]
    data = json.loads((root / "lm" / "config.json").read_text())
    # Llama 3 scaling with a low-frequency factor megatron-core does not reproduce.
    data["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    data["mlp_bias"] = True
    lm = tmp_path / "llama31"
    lm.mkdir()
    for name in os.listdir(root / "lm"):
        if name != "config.json":
            os.symlink(root / "lm" / name, lm / name)
    (lm / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError) as error:
        import_composed(str(root / "vision"), str(lm), "mlp", str(tmp_path / "out"), log=quiet)
    assert "rope_parameters.low_freq_factor = 2.0: megatron-core's Llama 3 scaling fixes it at 1" in str(error.value)
    assert "mlp_bias = true" in str(error.value)


def test_llama3_rope_scaling_is_reproduced(megatron_world, tmp_path, composed):
    """Llama 3.2's scaling (factor 32): the import keeps it and verifies; without it, the same
    weights no longer match (the check sees the scaled frequencies)."""
    import dataclasses

    from megavl.convert.composed import import_composed, verify_composed
    from megavl.convert.composed_sides import LM_SIDES, VISION_SIDES

    root = composed["siglip+pixel_shuffle+llama"][0]
    tokenizer = plain_tokenizer()
    save_lm("llama", str(tmp_path / "lm"), tokenizer, len(tokenizer), True,
            rope=dict(rope_type="llama3", rope_theta=10000.0, factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192))
    result = import_composed(str(root / "vision"), str(tmp_path / "lm"), "mlp", str(tmp_path / "out"),
                             vision_layer=-2, verify=True, log=quiet)
    assert result.config.model.lm.rope_scaling_factor == 32.0
    assert result.verification.ok, result.verification.describe()
    unscaled = dataclasses.replace(result.config, model=dataclasses.replace(
        result.config.model, lm=dataclasses.replace(result.config.model.lm, rope_scaling_factor=None)))
    check = verify_composed(VISION_SIDES["siglip_vision_model"], str(root / "vision"), LM_SIDES["LlamaForCausalLM"],
                            str(tmp_path / "lm"), unscaled, str(tmp_path / "out"), len(tokenizer),
                            set(tokenizer.all_special_ids))
    assert not check.ok and check.text_max_abs_diff > 10 * TOLERANCE, check.describe()


def test_the_composed_model_trains_from_its_checkpoint(composed, data_dir, tmp_path):  # noqa: F811
    """checkpoint.pretrained loads the composition; its own tokenizer reads the synthetic corpus."""
    root, _ = composed["siglip+pixel_shuffle+llama"]
    out = root / "out"
    run = tmp_path / "run"
    overrides = _overrides(data_dir, run, steps=8, extra=[
        f"checkpoint.pretrained={out}", f"data.tokenizer={out / 'tokenizer'}", NO_TASK_EVAL, "train.dtype=fp32",
    ])
    _train(1, overrides, config=out / "megavl_config.yaml")
    train, val = _metrics(run)
    assert len(train) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    first, last = sum(r["loss"] for r in train[:2]) / 2, sum(r["loss"] for r in train[-2:]) / 2
    assert last < first, f"loss did not fall: {first:.3f} -> {last:.3f}"
