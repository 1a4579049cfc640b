"""Evaluation items: one per answer, read from the shards in order, and prompts laid out exactly
as training laid out the same conversation up to its answer."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megavl.datasets.synthetic import generate

    out = tmp_path_factory.mktemp("eval_corpus")
    generate(str(out), train_samples=24, val_samples=30, seed=5, vocab_size=700, samples_per_shard=8)
    return out


def test_items_are_one_per_answer_in_shard_order(corpus):
    from megavl.eval.items import load_items, ordered_groups, read_records

    keys = [key for key, _ in read_records(str(corpus / "val"))]
    assert keys == [f"val-{i:07d}" for i in range(30)]  # four shards, read in their split order
    items = load_items(str(corpus / "val"))
    records = [json.loads(m["json"]) for _, m in read_records(str(corpus / "val"))]
    assert len(items) == sum(len(r["conversations"]) // 2 for r in records)
    assert len(load_items(str(corpus / "val"), limit=5)) == sum(len(r["conversations"]) // 2 for r in records[:5])
    groups = ordered_groups(items)
    assert set(groups) <= {"counting", "reading_en", "reading_ar", "pointing", "boxes", "multi_qa", "multi_image"}
    for item in items:
        record = next(r for r in records if item.key.split("#")[0] == r["id"])
        turn = int(item.key.split("#")[1]) if "#" in item.key else 0
        assert item.reference == record["conversations"][2 * turn + 1]["content"]
        assert item.prompt["conversations"] == record["conversations"][:2 * turn + 1]
        assert sorted(item.members) == [f"img{i}.png" for i in range(len(item.members))]
        if item.group == "pointing":
            x0, y0, x1, y1 = item.target_box
            assert x0 <= x1 and y0 <= y1  # the named object's box, which the true point lies in
            from megavl.eval.answers import parse_point

            _, x, y = parse_point(item.reference)
            assert x0 <= x <= x1 and y0 <= y <= y1


def test_a_prompt_is_the_training_layout_up_to_the_answer(corpus):
    """The prompt's tokens are exactly the training sample's tokens before the answer begins, with
    the same images: the model is asked as it was taught."""
    from megavl.config import load_config
    from megavl.data.image_backends import select_backend
    from megavl.data.records import RecordDecoder
    from megavl.data.tokenizer import load_tokenizer
    from megavl.eval.items import load_items, read_records
    from megavl.eval.task_eval import PromptBuilder

    config = load_config(str(TINY_CONFIG), ["data.conversation_mask_prob=0", "data.grounding_conversation_mask_prob=0",
                                            "data.image_backend=pillow"])
    tokenizer = load_tokenizer(str(corpus / "tokenizer"))
    items = load_items(str(corpus / "val"), limit=12)
    prompts, failures = PromptBuilder(tokenizer, config).build(items)
    assert failures == [None] * len(items)
    decoder = RecordDecoder(tokenizer, config, 0, select_backend("pillow"))
    members = dict(read_records(str(corpus / "val")))
    for item, prompt in zip(items, prompts):
        key = item.key.split("#")[0]
        trained = decoder.render([decoder.plan(key, members[key])])[0]
        assert trained.tokens[:len(prompt)] == prompt.tokens, item.key
        answer = tokenizer.encode(item.reference, add_special_tokens=False)
        assert trained.tokens[len(prompt):len(prompt) + len(answer)] == answer, item.key
        assert [im.grid_thw for im in prompt.images] == [im.grid_thw for im in trained.images]
        for ours, theirs in zip(prompt.images, trained.images):
            assert ours.pixel_values.equal(theirs.pixel_values)


def test_a_prompt_must_end_with_a_question():
    from megavl.config import load_config
    from megavl.data.conversation import SampleEncoder
    from conftest import tiny_tokenizer

    config = load_config(str(TINY_CONFIG))
    encoder = SampleEncoder(tiny_tokenizer(["a question and an answer"]), config, 0)
    record = {"id": "r", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match="a prompt ends with a user message"):
        encoder.encode(record, [], prompt=True)
    question = encoder.encode({"id": "q", "conversations": [{"role": "user", "content": "q"}]}, [], prompt=True)
    assert question.labels == [-100] * len(question)
    assert encoder.tokenizer.decode(question.tokens).endswith("<|im_start|>assistant\n")


def test_prompt_items_place_images_and_refuse_mismatches(tmp_path):
    from PIL import Image

    from megavl.eval.items import prompt_item

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "b.webp")
    item = prompt_item("How many?", [str(tmp_path / "a.png"), str(tmp_path / "b.webp")])
    assert item.prompt["conversations"][0]["content"] == "<image>\n<image>\nHow many?"
    assert sorted(item.members) == ["img0.png", "img1.png"]  # webp re-encoded as PNG
    inline = prompt_item("Compare <image> with <image>.", [str(tmp_path / "a.png"), str(tmp_path / "a.png")])
    assert inline.prompt["conversations"][0]["content"] == "Compare <image> with <image>."
    with pytest.raises(ValueError, match="1 <image> but 2 --image files"):
        prompt_item("Look: <image>", [str(tmp_path / "a.png"), str(tmp_path / "a.png")])
    (tmp_path / "junk.gif").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        prompt_item("?", [str(tmp_path / "junk.gif")])


def test_items_that_cannot_be_asked_are_counted_not_dropped(corpus, megatron_world):
    """A corrupt image skips its item with the reason, the others are scored; an evaluation where no
    item builds gives an empty table instead of stopping the run."""
    import dataclasses

    import torch

    from megavl.config import load_config
    from megavl.convert.megavl_model import single_process_config
    from megavl.data.tokenizer import load_tokenizer
    from megavl.eval.generation import GenerationSettings
    from megavl.eval.items import load_items
    from megavl.eval.task_eval import evaluate_tasks
    from megavl.models.build import build_model
    from megavl.platform.features import detect

    config = single_process_config(load_config(str(TINY_CONFIG), ["data.image_backend=pillow",
                                                                  "data.resolution.max_pixels=12544"]))
    torch.manual_seed(0)
    model = build_model(config)
    tokenizer = load_tokenizer(str(corpus / "tokenizer"))
    items = load_items(str(corpus / "val"), limit=4)
    broken = dataclasses.replace(items[0], members={name: b"not a png" for name in items[0].members})
    settings = GenerationSettings(max_new_tokens=3)
    results = evaluate_tasks(model, config, detect(), tokenizer, [broken, *items[1:]], settings, batch_size=2)
    assert results.skipped == {"bad_image": 1}
    assert sum(score.answers for score in results.groups.values()) == len(items) - 1
    assert "skipped: bad_image 1" in results.table()
    nothing = evaluate_tasks(model, config, detect(), tokenizer, [broken], settings)
    assert nothing.skipped == {"bad_image": 1} and nothing.metrics() == {}


def test_the_evaluate_tool_prints_the_table_and_writes_json(corpus, megatron_world, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    from conftest import ROOT
    from megavl.config import dump_config, load_config
    from megavl.convert.megavl_model import CONFIG_FILE, single_process_config
    from megavl.eval.items import load_items
    from megavl.models.build import build_model
    from megavl.training.checkpoint import save_model_weights

    config = single_process_config(load_config(str(TINY_CONFIG), [
        f"data.tokenizer={corpus / 'tokenizer'}", "data.image_backend=pillow", "data.resolution.max_pixels=12544"]))
    torch.manual_seed(0)
    save_model_weights(build_model(config), str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / CONFIG_FILE).write_text(dump_config(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}

    def evaluate(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--load", str(tmp_path / "ckpt"),
                               "--data", str(corpus / "val"), *args], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"))

    result = evaluate("--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    answers = sum(group["answers"] for group in saved["groups"].values())
    assert answers == len(load_items(str(corpus / "val"), 3))
    assert re.search(rf"^all +{answers} +[0-9.]+%$", result.stdout, re.MULTILINE), result.stdout
    assert saved["examples"] and {"question", "answer", "reference", "correct"} <= set(saved["examples"][0])
    bad = evaluate("--limit", "0")
    assert bad.returncode == 2 and "--limit 0" in bad.stderr
