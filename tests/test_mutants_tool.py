"""tools/mutants.py (make mutants) on a tiny repository of its own, and the curated list against this one."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look the module up
    spec.loader.exec_module(module)
    return module


mutants = _load("mutants_tool_under_test", ROOT / "tools" / "mutants.py")

ARITH = "def add(a, b):\n    return a + b\n\n\ndef scale(a, k):\n    return a * k\n"
TEST_ARITH = "from megavl.arith import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def _repo(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    """A git work tree with a package named megavl (as the editable install's) and one test of it."""
    root = tmp_path / "repo"
    files = {"megavl/__init__.py": "", "megavl/arith.py": ARITH, "tests/test_arith.py": TEST_ARITH, **(files or {})}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def _mutations(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "mutations.py"
    lines = ["from types import SimpleNamespace as M", "MUTATIONS = ["]
    for entry in entries:
        entry = {"file": "megavl/arith.py", "tests": ("tests/test_arith.py::test_add",), "bug": "a bug", **entry}
        lines.append(f"    M(**{entry!r}),")
    path.write_text("\n".join(lines + ["]"]) + "\n")
    return path


def _main(repo: Path, mutations: Path, *args: str) -> int:
    return mutants.main(["--root", str(repo), "--mutations", str(mutations), *args])


def test_a_caught_bug_is_killed_by_the_named_test_and_an_uncaught_one_survives_and_fails_the_check(tmp_path, capsys):
    repo = _repo(tmp_path)
    mutations = _mutations(
        tmp_path,
        {"name": "add-subtracts", "old": "return a + b", "new": "return a - b"},
        {"name": "scale-adds", "old": "return a * k", "new": "return a + k"},
    )
    assert _main(repo, mutations) == mutants.EXIT_SURVIVED
    out = capsys.readouterr().out
    assert re.search(r"^killed +add-subtracts +[\d.]+ s +tests/test_arith\.py::test_add$", out, re.M), out
    assert re.search(r"^SURVIVED +scale-adds +[\d.]+ s", out, re.M), out
    assert "1 killed, 1 survived, 0 errors of 2 mutations" in out
    assert (repo / "megavl" / "arith.py").read_text() == ARITH  # only the copy is mutated


def test_an_old_text_not_found_exactly_once_is_reported_before_anything_runs(tmp_path, capsys):
    repo = _repo(tmp_path, {"megavl/twice.py": "x = 1\nx = 1\n"})
    mutations = _mutations(
        tmp_path,
        {"name": "absent", "old": "return a ** b", "new": "return a - b"},
        {"name": "twice", "file": "megavl/twice.py", "old": "x = 1", "new": "x = 2"},
        {"name": "no-file", "file": "megavl/gone.py", "old": "x", "new": "y"},
    )
    assert _main(repo, mutations) == mutants.EXIT_LIST_ERROR
    out, err = capsys.readouterr()
    assert "absent: the old text is found 0 times in megavl/arith.py" in err
    assert "twice: the old text is found 2 times in megavl/twice.py" in err
    assert "no-file: megavl/gone.py does not exist" in err
    assert "copied" not in out  # nothing was copied or run


def test_tests_that_select_nothing_are_an_error_not_a_survivor(tmp_path, capsys):
    repo = _repo(tmp_path)
    mutations = _mutations(tmp_path, {"name": "renamed-test", "old": "return a + b", "new": "return a - b",
                                      "tests": ("tests/test_arith.py::test_renamed",)})
    assert _main(repo, mutations) == mutants.EXIT_LIST_ERROR
    out = capsys.readouterr().out
    assert re.search(r"^ERROR +renamed-test .*select nothing", out, re.M), out


def test_a_failing_baseline_stops_the_check_before_any_mutation(tmp_path, capsys):
    repo = _repo(tmp_path, {"tests/test_arith.py": TEST_ARITH.replace("== 5", "== 6")})
    mutations = _mutations(tmp_path, {"name": "add-subtracts", "old": "return a + b", "new": "return a - b"})
    assert _main(repo, mutations, "--baseline") == mutants.EXIT_LIST_ERROR
    out, err = capsys.readouterr()
    assert "baseline: the unmutated tests do not pass: tests/test_arith.py::test_add" in err
    assert "add-subtracts" not in out


def test_list_and_only(tmp_path, capsys):
    repo = _repo(tmp_path)
    mutations = _mutations(
        tmp_path,
        {"name": "add-subtracts", "old": "return a + b", "new": "return a - b", "bug": "add subtracts"},
        {"name": "scale-adds", "old": "return a * k", "new": "return a + k"},
    )
    assert _main(repo, mutations, "--list", "--only", "add-subtracts") == mutants.EXIT_OK
    out = capsys.readouterr().out
    assert "add-subtracts\n    megavl/arith.py: add subtracts\n    tests: tests/test_arith.py::test_add" in out
    assert "scale-adds" not in out
    assert _main(repo, mutations, "--only", "add-subtract") == mutants.EXIT_LIST_ERROR
    assert "unknown mutation(s) add-subtract" in capsys.readouterr().err


def test_the_copy_holds_what_git_sees_but_no_environment_data_or_runs(tmp_path):
    repo = _repo(tmp_path, {".gitignore": ".venv/\n/data/\n", ".venv/lib.py": "", "data/shard.tar": "",
                            "runs/metrics.jsonl": "", "notes.txt": "", "deleted.py": ""})
    subprocess.run(["git", "-C", str(repo), "add", "runs/metrics.jsonl", "deleted.py"], check=True)
    (repo / "deleted.py").unlink()
    assert mutants.repository_files(repo) == [
        ".gitignore", "megavl/__init__.py", "megavl/arith.py", "notes.txt", "tests/test_arith.py",
    ]


def test_the_copy_imports_its_own_megavl_and_the_check_refuses_a_copy_that_would_not(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    assert mutants.copy_repository(_repo(tmp_path), copy) == 3
    assert mutants.verify_isolation(copy) == str((copy / "megavl" / "__init__.py").resolve())
    # Without its own package the copy would test whatever megavl the environment has installed.
    for name in ("arith.py", "__init__.py"):
        (copy / "megavl" / name).unlink()
    (copy / "megavl").rmdir()
    with pytest.raises(mutants.ToolError, match="megavl"):
        mutants.verify_isolation(copy)


def test_a_copy_of_this_repository_imports_its_own_megavl(tmp_path):
    mutants.copy_repository(ROOT, tmp_path)
    assert (tmp_path / "tests" / "conftest.py").is_file() and not (tmp_path / ".venv").exists()
    assert Path(mutants.verify_isolation(tmp_path)).is_relative_to(tmp_path.resolve())


def test_every_curated_mutation_matches_the_code_once_and_names_tests_that_exist():
    mutations = mutants.load_mutations(ROOT / "tools" / "mutations.py")
    assert mutants.check_mutations(ROOT, mutations) == []
    for m in mutations:
        assert m.bug and "\n" not in m.bug, m.name
        for test in m.tests:
            path, _, function = test.partition("::")
            assert (ROOT / path).is_file(), f"{m.name}: {path}"
            function = function.split("[")[0]
            assert not function or f"def {function}(" in (ROOT / path).read_text(), f"{m.name}: {test}"
