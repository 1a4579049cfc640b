"""An exported folder works with transformers' standard entry points: AutoProcessor builds the
inputs megavl's training built (same tokens, same pixels), AutoModelForImageTextToText and
pipeline("image-text-to-text") answer as megavl's own generation does."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import TINY_CONFIG

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def exported(megatron_world, tmp_path_factory):
    """A tiny megavl model (bidirectional image attention, random vision LoRA, so the remote-code
    class) on a synthetic corpus's tokenizer, exported with its tokenizer."""
    from megavl.config import dump_config, load_config
    from megavl.convert import export_to_hf
    from megavl.convert.megavl_model import CONFIG_FILE, single_process_config
    from megavl.datasets.synthetic import generate
    from megavl.models.build import build_model
    from megavl.training.checkpoint import save_model_weights
    from workers.convert_tiny_models import quiet

    root = tmp_path_factory.mktemp("hf_tools")
    generate(str(root / "data"), train_samples=30, val_samples=12, seed=9, vocab_size=700, samples_per_shard=12)
    config = single_process_config(load_config(str(TINY_CONFIG), [
        f"data.tokenizer={root / 'data' / 'tokenizer'}", "data.image_backend=pillow",
        "data.resolution.max_pixels=12544", "model.lm.vision_lora.mlp_rank=4", "model.lm.vision_lora.attn_rank=2"]))
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_model_weights(model, str(root / "ckpt"))
    (root / "ckpt" / CONFIG_FILE).write_text(dump_config(config))
    export = export_to_hf(str(root / "ckpt"), str(root / "hf"), tokenizer=str(root / "data" / "tokenizer"),
                          verify=True, log=quiet)
    assert export.architecture == "MegavlQwen2_5_VLForConditionalGeneration"
    assert export.verification.ok, export.verification.describe()
    return root, config, model


def _items_and_prompts(root, config):
    from megavl.data.tokenizer import load_tokenizer
    from megavl.eval.items import load_items
    from megavl.eval.task_eval import PromptBuilder

    tokenizer = load_tokenizer(str(root / "data" / "tokenizer"))
    items = load_items(str(root / "data" / "val"), limit=6)
    prompts, failures = PromptBuilder(tokenizer, config).build(items)
    assert failures == [None] * len(items)
    return tokenizer, items, prompts


def _images(item):
    from PIL import Image

    return [Image.open(io.BytesIO(item.members[f"img{i}.png"])).convert("RGB") for i in range(len(item.members))]


def _megavl_answers(model, config, tokenizer, prompts):
    from megavl.eval.generation import GenerationSettings, Generator
    from megavl.platform.features import detect

    generator = Generator.for_tokenizer(model, config, detect(), tokenizer)
    return generator.generate(prompts, GenerationSettings(max_new_tokens=NEW_TOKENS))


def test_auto_processor_builds_the_training_inputs_and_the_model_answers_alike(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root, config, model = exported
    tokenizer, items, prompts = _items_and_prompts(root, config)
    processor = AutoProcessor.from_pretrained(str(root / "hf"), trust_remote_code=True)
    hf = AutoModelForImageTextToText.from_pretrained(str(root / "hf"), trust_remote_code=True, dtype=torch.float32)
    hf.eval()
    ours = _megavl_answers(model, config, tokenizer, prompts)
    assert len({tuple(a) for a in ours}) > 1
    for item, prompt, answer in zip(items, prompts, ours):
        text = processor.apply_chat_template(item.prompt["conversations"], add_generation_prompt=True, tokenize=False)
        inputs = processor(images=_images(item), text=[text], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt.tokens, item.key
        assert torch.equal(inputs["pixel_values"], torch.cat([im.pixel_values for im in prompt.images]))
        assert inputs["image_grid_thw"].tolist() == [list(im.grid_thw) for im in prompt.images]
        with torch.no_grad():
            output = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        generated = output[0, inputs["input_ids"].shape[1]:].tolist()
        # The exported generation config stops where megavl does and never draws the table's
        # padding rows (ids beyond the tokenizer, which this random model would otherwise pick).
        stops = [i for i, token in enumerate(generated) if token in hf.generation_config.eos_token_id]
        assert generated[:stops[0] if stops else None] == answer, item.key


def test_the_image_text_to_text_pipeline_answers_as_megavl(exported):
    from transformers import pipeline

    root, config, model = exported
    tokenizer, items, prompts = _items_and_prompts(root, config)
    ours = _megavl_answers(model, config, tokenizer, prompts)
    pipe = pipeline("image-text-to-text", model=str(root / "hf"), trust_remote_code=True, dtype=torch.float32)
    asked = 0
    for item, answer in zip(items, ours):
        # The chat form: the question as image and text parts, in the order (and with the
        # newlines) the record writes them.
        pieces = item.prompt["conversations"][-1]["content"].split("<image>")
        images = iter(_images(item))
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            parts.append({"type": "image", "image": next(images)})
            if piece:
                parts.append({"type": "text", "text": piece})
        if len(item.prompt["conversations"]) > 1:
            continue  # a later question of a multi-question record: the test above covers those
        result = pipe(text=[{"role": "user", "content": parts}], max_new_tokens=NEW_TOKENS, return_full_text=False,
                      generate_kwargs={"do_sample": False})
        assert result[0]["generated_text"] == tokenizer.decode(answer, skip_special_tokens=True), item.key
        asked += 1
    assert asked >= 3
