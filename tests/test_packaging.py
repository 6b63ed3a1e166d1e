"""A plain (non-editable) wheel carries the recipes and hub code under lora_grpo, and no generic top-level names."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is absent from the `packages` configuration" not in proc.stderr  # every package declared
    (wheel,) = tmp_path.glob("lora_grpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = [
        f"lora_grpo/{p.relative_to(ROOT / 'lora_grpo').as_posix()}"
        for p in (ROOT / "lora_grpo").rglob("*.py")
    ]
    sources += [f"lora_grpo/hub/{p.name}" for p in (ROOT / "hub").glob("*.py")]
    missing = [s for s in sources if s not in names]
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"
    top = {n.split("/")[0] for n in names}
    assert top <= {"lora_grpo", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, top
    for needed in (
        "lora_grpo/recipes/tiny-test.yaml",
        "lora_grpo/recipes/sd14-nudity-compact.yaml",
        "lora_grpo/recipes/anchors/compact.yaml",
        "lora_grpo/recipes/prompts/safe_captions.txt",
        "lora_grpo/recipes/matrix/toyworld.yaml",
        "lora_grpo/recipes/matrix/toyworld-text.yaml",
        "lora_grpo/recipes/matrix/sd.yaml",
        "lora_grpo/hub/__init__.py",
        "lora_grpo/cli.py",
        "lora_grpo/evaluation/run.py",
        "lora_grpo/toyworld/models/build.json",
        "lora_grpo/toyworld/models/toyworld-sd/model_index.json",
        "lora_grpo/toyworld/models/toyworld-sd/unet/diffusion_pytorch_model.safetensors",
        "lora_grpo/toyworld/models/toyworld-clip/model.safetensors",
    ):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lora-grpo = lora_grpo.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
