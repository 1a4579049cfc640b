"""metrics.png: a run's training loss, validation loss and task accuracy over steps, drawn from
its metrics.jsonl (written next to it at the end of a run; ``python -m
megavl.training.metrics_plot RUN_DIR`` redraws it for any run, finished or not)."""

from __future__ import annotations

import json
import os
import sys

PLOT_NAME = "metrics.png"
# Per-task accuracy lines drawn; the overall accuracy is always drawn.
TASKS = ("counting", "reading_en", "reading_ar", "pointing", "boxes", "multi_qa", "multi_image")


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a run resumed from an earlier
    checkpoint appends to the same file) keeps its latest value."""
    latest = {r["step"]: r[key] for r in rows if key in r and r[key] is not None}
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def plot_metrics(log_dir: str) -> str:
    """Draws log_dir/metrics.png from log_dir/metrics.jsonl; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    accuracy_keys = [k for k in ("task_all/accuracy", *(f"task_{t}/accuracy" for t in TASKS))
                     if any(k in r for r in rows)]
    panels = 2 if accuracy_keys else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    loss = axes[0][0]
    steps, values = _series(rows, "loss")
    loss.plot(steps, values, label="training loss", linewidth=1, alpha=0.8)
    steps, values = _series(rows, "val_loss")
    if steps:
        loss.plot(steps, values, "o-", label="validation loss")
    loss.set_xlabel("step")
    loss.set_ylabel("loss (answer tokens)")
    loss.set_yscale("log")
    loss.grid(alpha=0.3)
    loss.legend()
    if accuracy_keys:
        accuracy = axes[0][1]
        for key in accuracy_keys:
            steps, values = _series(rows, key)
            name = key[len("task_"):-len("/accuracy")]
            accuracy.plot(steps, [100 * v for v in values], "o-", label=name,
                          linewidth=2.5 if name == "all" else 1)
        accuracy.set_xlabel("step")
        accuracy.set_ylabel("task accuracy (%)")
        accuracy.set_ylim(0, 100)
        accuracy.grid(alpha=0.3)
        accuracy.legend(fontsize="small")
    figure.suptitle(os.path.basename(os.path.abspath(log_dir)))
    figure.tight_layout()
    path = os.path.join(log_dir, PLOT_NAME)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m megavl.training.metrics_plot RUN_DIR")
    print(plot_metrics(sys.argv[1]))
