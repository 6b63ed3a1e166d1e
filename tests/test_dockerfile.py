"""The Dockerfile, checked statically (no Docker daemon or registry here): it copies every source folder the
package build maps, installs an extra that exists, starts from a CUDA PyTorch image and runs `lora-grpo`."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    return [
        tuple(line.split(maxsplit=1)) for line in lines if line and not line.startswith("#") and " " in line
    ]


def test_dockerfile_copies_what_the_package_build_needs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = {"pyproject.toml", "README.md", "lora_grpo", *mapped}
    copied = set()
    for op, args in _instructions():
        if op == "COPY":
            copied.update(args.split()[:-1])
    assert needed <= copied, f"not copied: {needed - copied}"


def test_dockerfile_base_extras_and_entry_point():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ops = dict(_instructions())
    assert re.match(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", ops["FROM"])
    extras = re.findall(r'pip install "\.\[([a-z,]+)\]"', ops["RUN"])
    assert extras and set(extras[0].split(",")) <= set(pyproject["project"]["optional-dependencies"])
    assert ops["ENTRYPOINT"] == '["lora-grpo"]'
    assert "lora-grpo" in pyproject["project"]["scripts"]
