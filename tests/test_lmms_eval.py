"""lmms-eval runs offline on an exported folder with a task built from the synthetic validation
split, and its per-task accuracies equal tools/evaluate.py's on the same records."""

from __future__ import annotations

import json
import math

from test_hf_tools import exported  # noqa: F401  (a fixture)


def test_lmms_eval_scores_the_exported_model_as_megavl_does(exported, tmp_path):  # noqa: F811
    from megavl.data.tokenizer import load_tokenizer
    from megavl.eval import lmms_task
    from megavl.eval.generation import GenerationSettings
    from megavl.eval.items import load_items
    from megavl.eval.task_eval import evaluate_tasks
    from megavl.platform.features import detect

    root, config, model = exported
    items = load_items(str(root / "data" / "val"))
    lmms_task.write_task(items, str(tmp_path / "task"), max_new_tokens=12)
    docs = [json.loads(line) for line in (tmp_path / "task" / "docs.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == [item.key for item in items]
    assert all(len(d["images"]) == len(item.members) for d, item in zip(docs, items))

    from PIL import ImageFile

    theirs, their_answers = lmms_task.run(str(root / "hf"), str(tmp_path / "task"))
    # lmms-eval's import turns on Pillow's truncated-image loading; megavl's process keeps it off.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    tokenizer = load_tokenizer(str(root / "data" / "tokenizer"))
    # Answer by answer: megavl's generation on megavl's prompts, transformers' inside lmms-eval.
    from megavl.eval.generation import Generator
    from megavl.eval.task_eval import PromptBuilder

    prompts, _ = PromptBuilder(tokenizer, config).build(items)
    generated = Generator.for_tokenizer(model, config, detect(), tokenizer).generate(
        prompts, GenerationSettings(max_new_tokens=12))
    assert len({tuple(tokens) for tokens in generated}) > 1
    assert their_answers == {item.key: tokenizer.decode(tokens, skip_special_tokens=False)
                             for item, tokens in zip(items, generated)}
    ours = evaluate_tasks(model, config, detect(), tokenizer, items, GenerationSettings(max_new_tokens=12)).metrics()
    ours = {key[:-len("/accuracy")]: value for key, value in ours.items() if key.endswith("/accuracy")}
    assert sorted(theirs) == sorted(ours)
    assert all(math.isclose(theirs[g], ours[g], abs_tol=1e-9) for g in ours), (theirs, ours)
