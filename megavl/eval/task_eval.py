"""Task accuracy: generate answers for evaluation items and score them, on every rank's share.

Each data-parallel rank takes every DP-th item (tensor-parallel ranks of one DP rank run
the same prompts); scores are sums, reduced over the data-parallel group in one
all-reduce, so every rank ends with the whole table. Every rank runs the same number of
generation batches (a rank short of items repeats a prompt and discards the answer),
because MoE layers exchange tokens between ranks and must be called in lockstep.

An item whose prompt cannot be built (a broken image, a prompt longer than the model
takes) is counted under ``skipped`` with its reason and logged, never dropped unseen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megavl.config import Config
from megavl.eval.answers import Score, score_answer
from megavl.eval.generation import GenerationSettings, Generator
from megavl.eval.items import EvalItem, ordered_groups

log = logging.getLogger(__name__)

# Answers shown per evaluation (TensorBoard text, the tool's output).
EXAMPLES = 6


@dataclass
class TaskResults:
    groups: dict[str, Score]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging: per group accuracy (plus point distance, box IoU), and the
        accuracy over all answers."""
        out = {}
        for group, score in self.groups.items():
            if not score.answers:
                continue
            out[f"{group}/accuracy"] = score.correct / score.answers
            if group == "pointing" and score.parsed:
                out[f"{group}/point_distance"] = score.distance / score.parsed
            if group == "boxes":
                out[f"{group}/mean_iou"] = score.iou / score.answers
        total = sum(self.groups.values(), Score())
        if total.answers:
            out["all/accuracy"] = total.correct / total.answers
        return out

    def table(self) -> str:
        lines = [f"{'task':<12} {'answers':>7} {'accuracy':>8}  detail"]
        for group, score in self.groups.items():
            if not score.answers:
                continue
            detail = []
            if group == "pointing":
                detail.append(f"point inside the object; mean distance {score.distance / score.parsed:.0f}/1000"
                              if score.parsed else "point inside the object; none parsed")
            if group == "boxes":
                detail.append(f"IoU >= 0.5; mean IoU {score.iou / score.answers:.2f}")
            if score.parsed < score.answers:
                detail.append(f"{score.answers - score.parsed} malformed or naming another object")
            accuracy = 100 * score.correct / score.answers
            lines.append(f"{group:<12} {score.answers:>7d} {accuracy:>7.1f}%  {'; '.join(detail)}")
        total = sum(self.groups.values(), Score())
        if total.answers:
            lines.append(f"{'all':<12} {total.answers:>7d} {100 * total.correct / total.answers:>7.1f}%")
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "groups": {g: {f: getattr(s, f) for f in Score.FIELDS} for g, s in self.groups.items()},
            "metrics": self.metrics(),
            "skipped": self.skipped,
            "examples": self.examples,
        }


def _question(item: EvalItem) -> str:
    return item.prompt["conversations"][-1]["content"].replace("<image>\n", "").replace("<image>", "")


class PromptBuilder:
    """Evaluation items -> generation prompts through the training pipeline's record decoder
    (the same resolution policy, image back end and chat layout as training)."""

    def __init__(self, tokenizer, config: Config, backend=None):
        from megavl.data.image_backends import select_backend
        from megavl.data.records import RecordDecoder

        backend = backend or select_backend(config.data.image_backend)
        self.decoder = RecordDecoder(tokenizer, config, config.train.seed, backend)

    def build(self, items: Sequence[EvalItem]):
        """(prompts, failures) where failures[i] is None or the reason item i has no prompt."""
        from megavl.data.records import RecordSkip

        planned, failures = [], []
        for item in items:
            try:
                planned.append(self.decoder.plan_record(item.prompt, item.members, prompt=True))
                failures.append(None)
            except RecordSkip as skip:
                planned.append(None)
                failures.append(skip.reason)
        rendered = iter(self.decoder.render([p for p in planned if p is not None]))
        prompts = []
        for i, plan in enumerate(planned):
            if plan is None:
                prompts.append(None)
                continue
            result = next(rendered)
            if isinstance(result, RecordSkip):
                prompts.append(None)
                failures[i] = result.reason
            else:
                prompts.append(result)
        return prompts, failures


def evaluate_tasks(
    model,
    config: Config,
    platform,
    tokenizer,
    items: Sequence[EvalItem],
    settings: Optional[GenerationSettings] = None,
    batch_size: int = 8,
    data_rank: int = 0,
    data_world: int = 1,
    group=None,
) -> TaskResults:
    """Generates and scores this DP rank's share of ``items``; the result is the whole table
    (reduced over ``group``, the data-parallel group, when data_world > 1)."""
    settings = settings or GenerationSettings()
    groups = ordered_groups(list(items))
    generator = Generator.for_tokenizer(model, config, platform, tokenizer)
    builder = PromptBuilder(tokenizer, config)
    share = list(items[data_rank::data_world])
    per_rank = math.ceil(len(items) / data_world)
    batches = math.ceil(per_rank / batch_size) if per_rank else 0
    scores = {g: Score() for g in groups}
    skipped: dict[str, int] = {}
    examples: list[dict] = []
    filler = None  # a prompt to run where this rank has no item, so ranks stay in lockstep
    for b in range(batches):
        chunk = share[b * batch_size:(b + 1) * batch_size]
        prompts, failures = builder.build(chunk)
        for item, failure in zip(chunk, failures):
            if failure is not None:
                skipped[failure] = skipped.get(failure, 0) + 1
                log.warning("task evaluation: item %s skipped (%s)", item.key, failure)
        too_long = [i for i, p in enumerate(prompts) if p is not None
                    and len(p) + settings.max_new_tokens > generator_limit(config)]
        for i in too_long:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            log.warning("task evaluation: item %s skipped (too_long: %d prompt tokens)", chunk[i].key, len(prompts[i]))
            prompts[i] = None
        runnable = [(item, p) for item, p in zip(chunk, prompts) if p is not None]
        if runnable and filler is None:
            filler = runnable[0][1]
        if filler is None:
            filler = _filler_prompt(builder, items, settings, config)
        if filler is None:
            continue  # no item builds a prompt, on any rank (they hold the same items): nothing to run
        batch = [p for _, p in runnable] or [filler]
        answers = generator.generate(batch, settings)
        for (item, _), tokens in zip(runnable, answers):
            text = tokenizer.decode(tokens, skip_special_tokens=False)
            score = score_answer(text, item.reference, item.target_box)
            scores[item.group] = scores[item.group] + score
            if len(examples) < EXAMPLES:
                examples.append({"key": item.key, "task": item.group, "question": _question(item),
                                 "answer": text, "reference": item.reference, "correct": bool(score.correct)})
    if data_world > 1:
        scores, skipped = _reduced(scores, skipped, group)
    return TaskResults(scores, skipped, examples)


def generator_limit(config: Config) -> int:
    """The longest prompt plus answer the model takes."""
    return config.model.lm.max_position_embeddings


def _filler_prompt(builder: PromptBuilder, items: Sequence[EvalItem], settings, config):
    """The first item's prompt that builds, or None when none does. Every rank holds the same
    items and builds them alike, so all ranks find the same one, or all none."""
    for item in items:
        prompts, _ = builder.build([item])
        if prompts[0] is not None and len(prompts[0]) + settings.max_new_tokens <= generator_limit(config):
            return prompts[0]
    return None


def _reduced(scores: dict[str, Score], skipped: dict[str, int], group):
    """Scores and skip counts summed over the data-parallel group (one all-reduce; every rank
    knows the same groups, and the skip reasons are a fixed list)."""
    from megavl.data.records import RECORD_SKIP_REASONS
    from megavl.platform.distributed import collective_device

    reasons = list(RECORD_SKIP_REASONS) + ["too_long"]
    names = list(scores)
    values = [v for name in names for v in scores[name].as_list()] + [float(skipped.get(r, 0)) for r in reasons]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(tensor, group=group)
    values = tensor.cpu().tolist()
    width = len(Score.FIELDS)
    reduced = {name: Score.from_list(values[i * width:(i + 1) * width]) for i, name in enumerate(names)}
    tail = values[len(names) * width:]
    return reduced, {r: round(n) for r, n in zip(reasons, tail) if n}
