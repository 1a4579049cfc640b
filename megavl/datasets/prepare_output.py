"""The output folder of tools/prepare_data.py: claiming it, clearing an earlier run, writing files whole.

A folder is this tool's to overwrite only when it is new, empty, or holds
the MARKER file an earlier run left; the report and summary appear only
once complete (megavl/datasets/prepare.py lists the folder's contents).
"""

from __future__ import annotations

import os
import shutil

from megavl.datasets.energon_meta import META_DIR
from megavl.datasets.prepare_checks import PrepareError
from megavl.datasets.shards import TEMPORARY_SUFFIX

MARKER = ".megavl-prepare"
REPORT = "report.jsonl"
SUMMARY = "summary.json"


def claim_output_dir(out_dir: str) -> None:
    """Creates ``out_dir``, or empties it of a previous run's output; refuses anything else."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out {out_dir!r} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    entries = os.listdir(out_dir)
    if entries and MARKER not in entries:
        raise PrepareError(
            f"--out {out_dir!r} is not empty and is not an earlier output of this tool (it has no {MARKER} "
            "file); give a new or empty folder"
        )
    for name in entries:
        path = os.path.join(out_dir, name)
        if name == META_DIR and os.path.isdir(path):
            shutil.rmtree(path)
        elif _is_previous_output(name):
            os.remove(path)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        f.write("written by tools/prepare_data.py; the folder may be overwritten by its next run\n")


def _temp_name(name: str) -> str:
    # Hidden: the report and summary appear only when complete.
    return f".{name}.tmp"


def _is_previous_output(name: str) -> bool:
    temporary = name.startswith(".") and name.endswith(".tmp")
    return name in (REPORT, SUMMARY) or name.endswith((".tar", ".tar.idx", TEMPORARY_SUFFIX)) or temporary


def write_atomically(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, _temp_name(name))
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)
