"""An lmms-eval task made from a megavl evaluation set, and the model lmms-eval runs it with.

``write_task(items, out_dir)`` writes a task folder lmms-eval loads offline:

    out_dir/megavl_tasks.yaml   the task (name megavl_tasks), reading docs.jsonl with datasets' json builder
    out_dir/docs.jsonl          one document per answer: question, earlier turns, image files, reference
    out_dir/images/             the documents' images as files
    out_dir/utils.py            doc_to_visual / doc_to_text / process_results (megavl/eval/lmms_task_utils.py)

``hf_model(folder)`` is an lmms-eval model (``lmms_eval.api.model.lmms``) over an exported
Hugging Face folder: transformers' AutoProcessor and AutoModelForImageTextToText
(trust_remote_code for megavl's own class), greedy ``generate``. lmms-eval is imported
only when the model is made.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

from megavl.eval.items import EvalItem, ordered_groups

TASK_NAME = "megavl_tasks"


def write_task(items: Sequence[EvalItem], out_dir: str, max_new_tokens: int = 64) -> str:
    """Writes the task folder; returns the task's name."""
    import yaml

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    groups = ordered_groups(list(items))
    with open(os.path.join(out_dir, "docs.jsonl"), "w", encoding="utf-8") as f:
        for item in items:
            stem = item.key.replace("#", "_")
            images = []
            for name, data in sorted(item.members.items()):
                path = os.path.abspath(os.path.join(out_dir, "images", f"{stem}.{name}"))
                with open(path, "wb") as image:
                    image.write(data)
                images.append(path)
            conversation = item.prompt["conversations"]
            doc = {"id": item.key, "group": item.group, "all_groups": groups, "question": conversation[-1]["content"],
                   "history": conversation[:-1], "images": images, "reference": item.reference,
                   "target_box": item.target_box}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "lmms_task_utils.py"), os.path.join(out_dir, "utils.py"))
    task = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(os.path.join(out_dir, "docs.jsonl"))},
                           "cache_dir": os.path.abspath(os.path.join(out_dir, "cache"))},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "UTILS.doc_to_visual",
        "doc_to_text": "UTILS.doc_to_text",
        "doc_to_target": "reference",
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "process_results": "UTILS.process_results",
        "metric_list": [{"metric": f"{group}_accuracy", "aggregation": "UTILS.mean_accuracy", "higher_is_better": True}
                        for group in ["all", *groups]],
        "metadata": [{"version": 0.0}],
    }
    text = yaml.safe_dump(task, sort_keys=False, allow_unicode=True)
    # lmms-eval resolves functions from the folder's utils.py through its `!function` tag.
    text = text.replace("UTILS.", "!function utils.")
    with open(os.path.join(out_dir, f"{TASK_NAME}.yaml"), "w", encoding="utf-8") as f:
        f.write(text)
    return TASK_NAME


def _import_lmms_eval():
    """lmms-eval's evaluator, task manager and model base class. Importing lmms-eval sets Pillow's
    process-wide LOAD_TRUNCATED_IMAGES, under which a truncated image decodes instead of failing;
    megavl counts such images as bad, so the setting is put back."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        from lmms_eval import evaluator
        from lmms_eval.api.model import lmms
        from lmms_eval.tasks import TaskManager
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    return evaluator, TaskManager, lmms


def hf_model(folder: str):
    """An lmms-eval model answering with the exported Hugging Face model in folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, _, lmms = _import_lmms_eval()

    class ExportedModel(lmms):
        def __init__(self):
            super().__init__()
            self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                                     dtype=torch.float32)
            self.model.eval()
            eos = self.model.generation_config.eos_token_id
            self.stops = set([eos] if isinstance(eos, int) else eos or [])

        def generate_until(self, requests) -> list[str]:
            answers = []
            for request in requests:
                context, kwargs, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                messages = [*(doc.get("history") or []), {"role": "user", "content": context}]
                text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                images = doc_to_visual(doc) or None
                inputs = self.processor(images=images, text=[text], return_tensors="pt")
                with torch.no_grad():
                    output = self.model.generate(**inputs, max_new_tokens=kwargs.get("max_new_tokens", 64),
                                                 do_sample=False)
                tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
                ends = [i for i, token in enumerate(tokens) if token in self.stops]
                tokens = tokens[:ends[0]] if ends else tokens
                # Special tokens stay: grounding answers are written with them.
                answers.append(self.processor.tokenizer.decode(tokens, skip_special_tokens=False))
            return answers

        def loglikelihood(self, requests):
            raise NotImplementedError("megavl's lmms-eval model answers generate_until tasks only")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("megavl's lmms-eval model answers generate_until tasks only")

    return ExportedModel()


def run(folder: str, task_dir: str) -> tuple[dict, dict]:
    """lmms-eval's results for the task in task_dir, answered by the exported model in folder:
    ({group: accuracy} (plus "all"), {document id: answer})."""
    evaluator, TaskManager, _ = _import_lmms_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # lmms-eval 0.7 patches filelock 3's private filelock._api to make dataset locks re-entrant;
    # filelock 4 (which megatron-energon's storage client needs) has no such module. One
    # process loading one local json file takes no lock twice, so the patch is skipped.
    evaluator._enable_reentrant_filelocks._patched = True
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    results = evaluator.simple_evaluate(model=hf_model(folder), tasks=[TASK_NAME], task_manager=manager,
                                        batch_size=1, log_samples=True, bootstrap_iters=0)
    scores = results["results"][TASK_NAME]
    accuracies = {key.split(",")[0][:-len("_accuracy")]: value for key, value in scores.items()
                  if key.endswith("_accuracy,none")}
    answers = {sample["doc"]["id"]: sample["resps"][0][0] for sample in results["samples"][TASK_NAME]}
    return accuracies, answers
