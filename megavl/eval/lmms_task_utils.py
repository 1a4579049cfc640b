"""lmms-eval task functions for a megavl evaluation set (copied into the task folder as utils.py
by megavl/eval/lmms_task.py; lmms-eval imports it from there).

Each document is one question: its images (files), the conversation before it, the reference
answer and, for a pointing question, the named object's box. Answers are scored by megavl's own
rules (megavl/eval/answers.py), so lmms-eval's numbers mean what tools/evaluate.py's mean.
"""

from PIL import Image

from megavl.eval.answers import score_answer


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    score = score_answer(results[0], doc["reference"], doc["target_box"])
    values = {f"{group}_accuracy": None for group in doc["all_groups"]}
    values[f"{doc['group']}_accuracy"] = score.correct
    values["all_accuracy"] = score.correct
    return values


def mean_accuracy(values):
    """The fraction of correct answers among the documents of one group (the others give None)."""
    answers = [v for v in values if v is not None]
    return sum(answers) / len(answers) if answers else float("nan")
