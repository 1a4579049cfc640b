"""The GPU image installs what setup.py's gpu extra asks for (or takes it from the base image),
runs as a non-root user and downloads nothing from a model hub. Docker cannot run here: the
Dockerfile is checked as text against the installed package's metadata."""

from __future__ import annotations

import re
from importlib.metadata import requires

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extra(extra: str) -> set[str]:
    return {_name(r) for r in requires("megavl") if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", r)}


def test_the_image_installs_the_gpu_extra_or_has_it_in_its_base():
    installs = re.search(r'pip install [^\n]*-e "\.\[([\w,]+)\]"', DOCKERFILE)
    assert installs, "the Dockerfile must install megavl with its extras"
    installed = set().union(*(_extra(e) for e in installs.group(1).split(",")))
    provided = {_name(n) for n in re.search(r"# base image provides: (.+)", DOCKERFILE).group(1).split(",")}
    assert _extra("gpu"), "setup.py has no gpu extra"
    assert _extra("gpu") <= installed | provided, _extra("gpu") - installed - provided


def test_the_image_runs_as_a_non_root_user_offline():
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\S+$", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] != "root"
    assert "HF_HUB_OFFLINE=1" in DOCKERFILE
    assert not re.search(r"huggingface-cli|hf_hub_download|from_pretrained|snapshot_download", DOCKERFILE)
