"""Mutation check: does the test suite catch the bugs it is meant to catch?

    python tools/mutants.py [--only NAME ...] [--baseline] [--list] [--keep] [--mutations FILE]

Each entry of a curated list (tools/mutations.py) is a realistic bug: an exact
snippet of one file and what it becomes, plus the few tests that should fail
when it is there. For every entry this tool puts the bug into a temporary copy
of the repository, runs those tests there (``pytest -x -q``) and reports
whether they failed (the mutant is *killed*) or passed (it *survived*), which
test failed first and how long it took. The exit status is 1 when any mutant
survives, and 2 when the list no longer matches the code (a snippet that is
not found exactly once in its file, tests that select nothing) or the check
cannot run at all (see isolation below, and --baseline). So the list cannot
rot silently as the code changes.

The driver is hand-written on purpose. Mutation-testing libraries (mutmut,
cosmic-ray) generate random operator swaps and rerun a test command for each;
with this suite's model builds and torchrun tests that is hours to days of
CPU time, and most random mutants are not bugs anyone would write. A short
list of realistic bugs, each run against the fastest tests that catch it,
takes minutes.

Isolation: the copy holds the repository's files as git sees them (tracked and
untracked files, minus what .gitignore excludes, so no .venv, data or runs) and
the real checkout is never written. pytest runs with the copy as its working
directory and as the only PYTHONPATH entry, which puts the copy's megavl ahead
of the editable install; the tool checks that once and stops if it is not so.
tests/conftest.py derives its root from its own path, so torchrun workers the
tests start import the copy as well. Bytecode is not written in the copy: a
restored file of the same size in the same second as its mutant could
otherwise run a stale .pyc.

``--baseline`` first runs the union of the selected tests on the unmutated
copy; they must pass, or the verdicts would mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
DEFAULT_MUTATIONS = TOOLS / "mutations.py"
# Left out of the copy even if tracked: the environment, datasets and run outputs.
EXCLUDED_TOP_LEVEL = (".venv", "data", "runs")
PYTEST_OPTIONS = ("-x", "-q", "-p", "no:cacheprovider", "-rfE")
# pytest's exit codes: tests failed, interrupted (a collection error under -x),
# usage error (e.g. an unknown node id), no tests collected.
_FAILED, _INTERRUPTED, _USAGE_ERROR, _NO_TESTS = 1, 2, 4, 5
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")

EXIT_OK, EXIT_SURVIVED, EXIT_LIST_ERROR = 0, 1, 2


@dataclass
class Outcome:
    name: str
    verdict: str  # "killed", "survived" or "error"
    seconds: float
    detail: str  # the killing test, or what went wrong


class ToolError(RuntimeError):
    """The check itself cannot run (copy, environment, baseline)."""


def load_mutations(path: Path) -> list:
    """MUTATIONS of a mutations file (tools/mutations.py by default)."""
    spec = importlib.util.spec_from_file_location("megavl_mutations_list", path)
    if spec is None or spec.loader is None:
        raise ToolError(f"cannot load the mutation list {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    mutations = list(module.MUTATIONS)
    names = [m.name for m in mutations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolError(f"{path}: mutation names used more than once: {', '.join(duplicates)}")
    return mutations


def check_mutations(root: Path, mutations: Iterable) -> list[str]:
    """Problems that make entries meaningless: missing files, snippets not found exactly once, no tests."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: the old text is found {count} times in {m.file} (must be exactly once)")
        if m.old == m.new:
            problems.append(f"{m.name}: old and new text are the same")
        if not m.tests:
            problems.append(f"{m.name}: names no tests")
    return problems


def repository_files(root: Path) -> list[str]:
    """The files git sees in root's work tree (tracked, or untracked and not ignored), relative to root."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True,
    )
    if listed.returncode != 0:
        raise ToolError(f"git ls-files failed in {root}: {listed.stderr.strip()}")
    files = []
    for name in sorted(set(filter(None, listed.stdout.split("\0")))):
        if name.split("/", 1)[0] in EXCLUDED_TOP_LEVEL:
            continue
        path = root / name
        if path.is_symlink() or path.is_file():  # a tracked file deleted in the work tree is skipped
            files.append(name)
    return files


def copy_repository(root: Path, dest: Path) -> int:
    """Copies root's files (see repository_files) into dest; returns how many."""
    files = repository_files(root)
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)
    return len(files)


def copy_environment(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def verify_isolation(copy: Path, package: str = "megavl") -> str:
    """Where the copy's Python finds package; raises ToolError unless that is inside the copy."""
    shown = subprocess.run(
        [sys.executable, "-c", f"import {package}; print({package}.__file__)"],
        cwd=copy, env=copy_environment(copy), capture_output=True, text=True,
    )
    if shown.returncode != 0:
        raise ToolError(f"the copy {copy} cannot import {package}:\n{shown.stderr.strip()}")
    where = Path(shown.stdout.strip()).resolve()
    if not where.is_relative_to(copy.resolve()):
        raise ToolError(
            f"tests in the copy {copy} would import {package} from {where}, not from the copy; "
            "every verdict would be about the unmutated code"
        )
    return str(where)


def run_tests(copy: Path, tests: Sequence[str], timeout: float) -> tuple[str, str]:
    """Runs pytest on tests in the copy: ("passed" | "failed" | "error", the first failing test or the reason)."""
    command = [sys.executable, "-m", "pytest", *PYTEST_OPTIONS, *tests]
    # A session of its own, so that a timeout also ends the torchrun workers a test started.
    process = subprocess.Popen(command, cwd=copy, env=copy_environment(copy), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(process)
        return "failed", f"timeout after {timeout:.0f} s"
    except BaseException:  # e.g. Ctrl-C, which the pytest session of its own does not receive
        _kill_session(process)
        raise
    if process.returncode == 0:
        return "passed", ""
    if process.returncode in (_FAILED, _INTERRUPTED):
        for line in output.splitlines():
            match = _SUMMARY_LINE.match(line)
            if match:
                return "failed", match.group(2) + (" (error)" if match.group(1) == "ERROR" else "")
        if process.returncode == _FAILED:
            return "failed", "pytest reported a failure without naming the test"
    if process.returncode in (_USAGE_ERROR, _NO_TESTS):
        return "error", (f"the tests {' '.join(tests)} select nothing (pytest exit {process.returncode}):\n"
                         + _tail(output))
    return "error", f"pytest exited {process.returncode}:\n" + _tail(output)


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_mutation(copy: Path, mutation, timeout: float) -> Outcome:
    """Applies mutation to the copy, runs its tests, restores the file."""
    path = copy / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return Outcome(mutation.name, "error", 0.0, f"the old text is not found exactly once in {mutation.file}")
    start = time.monotonic()
    try:
        path.write_text(original.replace(mutation.old, mutation.new, 1))
        status, detail = run_tests(copy, mutation.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    verdict = {"failed": "killed", "passed": "survived", "error": "error"}[status]
    return Outcome(mutation.name, verdict, seconds, detail)


def select(mutations: list, only: Optional[Sequence[str]]) -> list:
    if not only:
        return mutations
    wanted = [n for item in only for n in item.split(",") if n]
    known = {m.name for m in mutations}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ToolError(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    return [m for m in mutations if m.name in wanted]


def baseline_runs(mutations: Iterable) -> list[tuple[str, ...]]:
    """The pytest selections a baseline runs: every node id and file once, in one run; an entry that
    passes options (a -k expression) in a run of its own."""
    plain: dict[str, None] = {}
    own: dict[tuple[str, ...], None] = {}
    for m in mutations:
        if any(t.startswith("-") for t in m.tests):
            own[tuple(m.tests)] = None
        else:
            plain.update(dict.fromkeys(m.tests))
    return ([tuple(plain)] if plain else []) + list(own)


def print_list(mutations: Iterable) -> None:
    for m in mutations:
        print(f"{m.name}\n    {m.file}: {m.bug}\n    tests: {' '.join(m.tests)}")


def report_line(outcome: Outcome) -> str:
    verdict = outcome.verdict.upper() if outcome.verdict != "killed" else outcome.verdict
    first, _, rest = outcome.detail.partition("\n")
    line = f"{verdict:<9} {outcome.name:<34} {outcome.seconds:6.1f} s  {first}"
    return line + ("\n" + rest if rest else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only these mutations (repeatable, or comma-separated)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the selected mutations' tests on the unmutated copy; they must pass")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and print where it is")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation (default 900)")
    parser.add_argument("--mutations", type=Path, default=DEFAULT_MUTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ToolError as e:
        print(f"mutants: {e}", file=sys.stderr)
        return EXIT_LIST_ERROR


def _run(args) -> int:
    root = args.root.resolve()
    mutations = select(load_mutations(args.mutations), args.only)
    if args.list:
        print_list(mutations)
        return EXIT_OK
    problems = check_mutations(root, mutations)
    if problems:
        print("mutants: the list does not match the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_LIST_ERROR
    copy = Path(tempfile.mkdtemp(prefix="megavl-mutants-"))
    try:
        count = copy_repository(root, copy)
        where = verify_isolation(copy)
        print(f"copied {count} files to {copy}; its tests import {where}", flush=True)
        if args.baseline:
            start = time.monotonic()
            for tests in baseline_runs(mutations):
                status, detail = run_tests(copy, tests, args.timeout * len(mutations))
                if status != "passed":
                    raise ToolError(f"baseline: the unmutated tests do not pass: {detail or status}")
            print(f"baseline passed in {time.monotonic() - start:.1f} s", flush=True)
        outcomes = []
        started = time.monotonic()
        for mutation in mutations:
            outcome = run_mutation(copy, mutation, args.timeout)
            outcomes.append(outcome)
            print(report_line(outcome), flush=True)
        total = time.monotonic() - started
    finally:
        if args.keep:
            print(f"kept the copy at {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    counts = {v: sum(o.verdict == v for o in outcomes) for v in ("killed", "survived", "error")}
    print(f"{counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
          f"of {len(outcomes)} mutations in {total:.0f} s")
    if counts["error"]:
        return EXIT_LIST_ERROR
    return EXIT_SURVIVED if counts["survived"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
