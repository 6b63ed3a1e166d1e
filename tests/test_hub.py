"""Export for diffusers and ComfyUI, the model card, and pushing to a loopback Hub server."""

import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_grpo.config import LoraSettings, ModelConfig, load_config, save_config
from lora_grpo.errors import UserError
from lora_grpo.hub.export import export
from lora_grpo.hub.push import push
from lora_grpo.models import add_lora, load_adapter, load_pipeline, resolve_model_ref, save_adapter
from lora_grpo.recipe_files import find_recipe

RANK, ALPHA = 2, 6.0  # alpha != rank: a wrong scale would show


def image(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(
        "a red circle", num_inference_steps=4, guidance_scale=2.0, generator=gen, output_type="np"
    ).images


@pytest.fixture(scope="module")
def run_dir(tiny_sd_dir, tmp_path_factory):
    """A run directory as `lora-grpo train` writes it, with a LoRA whose weights are far from zero."""
    run = tmp_path_factory.mktemp("run")
    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    for p in add_lora(pipe.unet, LoraSettings(rank=RANK, alpha=ALPHA)):
        with torch.no_grad():
            p.add_(0.2 * torch.randn_like(p))
    save_adapter(pipe.unet, run / "adapter", base_model=str(tiny_sd_dir))
    config = load_config(
        find_recipe("tiny-test"), [f"model.base={tiny_sd_dir}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}"]
    )
    save_config(config, run / "config.yaml")
    rows = [
        {"epoch": e, "reward_safe_mean": 0.1 + 0.01 * e, "reward_unsafe_mean": 0.05 + 0.02 * e}
        for e in range(1, 4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe.unet.eval()
    return run, image(pipe), pipe


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export(run_dir[0], out, name="tiny-safety", repo_id="someone/tiny-safety", log=lambda line: None)
    return out


def fresh(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_folder_contents(exported):
    names = {p.name for p in exported.iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "tiny-safety_comfyui.safetensors",
        "README.md",
        "recipe.yaml",
    } <= names
    assert "reward_curves.png" in names
    assert yaml.safe_load((exported / "recipe.yaml").read_text())["lora"]["alpha"] == ALPHA


def test_diffusers_round_trip(run_dir, exported, tiny_sd_dir):
    _, trained, _ = run_dir
    pipe = fresh(tiny_sd_dir)
    base = image(pipe)
    pipe.load_lora_weights(str(exported))
    assert abs(trained - base).max() > 1e-3
    assert abs(image(pipe) - trained).max() < 1e-5


def test_kohya_file_round_trip_and_keys(run_dir, exported, tiny_sd_dir):
    _, trained, pipe = run_dir
    comfy = exported / "tiny-safety_comfyui.safetensors"
    with safe_open(str(comfy), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    pattern = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)][:3]
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.unet.named_parameters() if ".lora_A" in n}
    assert len(keys) == 3 * len(lora_modules) and len(alphas) == len(lora_modules)
    expected = {"lora_unet_" + m.replace(".", "_") for m in lora_modules}
    assert {
        k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k[: -len(".alpha")] for k in keys
    } == expected
    assert all(v.item() == ALPHA for v in alphas.values())
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_network_module"] == "networks.lora"
    for key in (
        "ss_base_model_version",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.date",
        "modelspec.license",
    ):
        assert meta.get(key), key
    pipe2 = fresh(tiny_sd_dir)
    pipe2.load_lora_weights(str(exported), weight_name=comfy.name)
    assert abs(image(pipe2) - trained).max() < 1e-5


def test_model_card(exported, tiny_sd_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    # a local base folder is named by its folder name: the card never shows a path of this machine
    assert data["base_model"] == tiny_sd_dir.name
    assert {"lora", "safety", "stable-diffusion", "template:sd-lora"} <= set(data["tags"])
    assert data["license"] == "creativeml-openrail-m"
    text = card.text
    for needle in (
        "alpha 0.5",
        "group size G 4",
        "LoRA rank 2, alpha 6.0",
        "a safe",
        "pornographic material",
        "LoraLoaderModelOnly",
        "reward_curves.png",
    ):
        assert needle in text, needle
    # the usage snippet runs as written against the exported folder
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = (
        code.replace('"someone/tiny-safety"', repr(str(exported)))
        .replace(f'"{tiny_sd_dir.name}"', repr(str(tiny_sd_dir)))  # where this machine keeps that folder
        .replace("num_inference_steps=30", "num_inference_steps=2")
    )
    scope = {}
    exec(compile(code, "model-card-snippet", "exec"), scope)
    assert scope["image"].size == (32, 32)


def test_fused_export_matches_adapter(run_dir, tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    out = export(run_dir[0], tmp_path / "e", fused=True, log=lambda line: None)
    fused = StableDiffusionPipeline.from_pretrained(out / "fused", local_files_only=True)
    fused.set_progress_bar_config(disable=True)
    # merging the LoRA into the weights rounds differently from applying it on the fly: measured 1.4e-4 on
    # one CPU, under 1e-4 on another, while the adapter itself moves this image by ~0.3
    assert abs(image(fused) - run_dir[1]).max() < 1e-3
    assert abs(image(fresh(tiny_sd_dir)) - run_dir[1]).max() > 0.1


def test_adapter_refuses_the_wrong_base(exported, tmp_path):
    from lora_grpo.tiny import build_tiny_pipeline, tiny_unet

    other = build_tiny_pipeline(tmp_path / "other")
    # same family name, different shapes: change the cross-attention width
    from diffusers import UNet2DConditionModel

    unet = tiny_unet(cross_attention_dim=48)
    assert isinstance(unet, UNet2DConditionModel)
    pipe = load_pipeline(ModelConfig(base=str(other)))
    pipe.unet = unet
    with pytest.raises(
        UserError,
        match=r"was trained for a custom UNet \(custom:cross32.* but this base model is a custom UNet "
        r"\(custom:cross48",
    ):
        load_adapter(pipe, exported)


def test_export_errors(tmp_path):
    with pytest.raises(UserError, match="no adapter found"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.yaml"):
        export(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ loopback Hub
class FakeHub(BaseHTTPRequestHandler):
    """Just the requests create_repo + upload_folder make; records the committed files."""

    status_override: int | None = None
    commits: list = []
    seen_paths: list = []
    auth_headers: list = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _json(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server API)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        FakeHub.seen_paths.append(self.path)
        FakeHub.auth_headers.append(self.headers.get("Authorization", ""))
        if FakeHub.status_override:
            return self._json(FakeHub.status_override, {"error": "nope"})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}"})
        if self.path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if "/branch/" in self.path:
            return self._json(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            FakeHub.commits.append(files)
            repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            oid = "a" * 40
            return self._json(
                200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid}
            )
        return self._json(404, {"error": f"unexpected {self.path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    FakeHub.status_override, FakeHub.commits, FakeHub.seen_paths, FakeHub.auth_headers = None, [], [], []
    yield endpoint
    server.shutdown()


SECRET = "hf_test_SECRET_token_123"


def test_push_uploads_the_exported_files(fake_hub, exported, capsys, caplog):
    from lora_grpo.cli import main

    code = main(["push", str(exported), "--repo", "someone/tiny-safety", "--token", SECRET])
    out, err = capsys.readouterr()
    assert code == 0, err
    (files,) = FakeHub.commits
    local = {p.relative_to(exported).as_posix(): p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    assert files == local
    assert all(SECRET in h for h in FakeHub.auth_headers)
    assert SECRET not in out + err + caplog.text


def test_push_to_a_branch_private(fake_hub, exported):
    url = push(exported, "someone/tiny-safety", private=True, revision="v1", token=SECRET)
    assert "/api/models/someone/tiny-safety/branch/v1" in FakeHub.seen_paths
    assert "/api/models/someone/tiny-safety/commit/v1" in FakeHub.seen_paths
    assert url.endswith("/commit/" + "a" * 40)


@pytest.mark.parametrize(
    "status, message", [(401, "rejected the token"), (403, "permission denied for someone/tiny-safety")]
)
def test_push_auth_errors(fake_hub, exported, capsys, caplog, status, message):
    from lora_grpo.cli import main

    FakeHub.status_override = status
    code = main(["push", str(exported), "--repo", "someone/tiny-safety", "--token", SECRET])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert SECRET not in out + err + caplog.text


def test_push_input_errors(exported, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="no Hugging Face token"):
        push(exported, "someone/x")
    with pytest.raises(UserError, match="is not an export"):
        push(tmp_path, "someone/x", token=SECRET)


def test_push_network_unreachable(exported, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="could not reach the Hugging Face Hub") as info:
        push(exported, "someone/x", token=SECRET)
    assert SECRET not in str(info.value)


def test_card_reports_evaluation_numbers(run_dir, tmp_path):
    report = {
        "before": {"unsafe": {"red_rate": 0.85, "position_accuracy": 0.95}},
        "after": {"unsafe": {"red_rate": 0.05, "position_accuracy": 0.93}},
    }
    (run_dir[0] / "toyworld_report.json").write_text(json.dumps(report))
    try:
        out = export(run_dir[0], tmp_path / "e", log=lambda line: None)
    finally:
        (run_dir[0] / "toyworld_report.json").unlink()
    text = (out / "README.md").read_text()
    assert "| unsafe | red_rate | 0.8500 | 0.0500 |" in text
    assert "| unsafe | position_accuracy | 0.9500 | 0.9300 |" in text


def test_card_shows_the_attacks_saved_in_the_run(run_dir, tmp_path):
    """RUN/attacks/<name>/attack.json: one ASR row each, base against adapter (NudeNet at 0.45 / 0.6)."""
    rates = lambda a, b: {"asr@0.45": a, "asr@0.6": b}  # noqa: E731
    attack = {
        "method": "unlearndiff",
        "protocol": {"detector": "nudenet", "images_per_prompt": 1},
        "targets": [{}, {}],
        "asr": {
            "base": {"unsafe": rates(0.9, 0.8), "neutral": rates(0.2, 0.1), "attack": rates(0.7, 0.6)},
            "adapter": {"unsafe": rates(0.1, 0.0), "neutral": rates(0.0, 0.0), "attack": rates(0.3, 0.25)},
        },
    }
    folder = run_dir[0] / "attacks" / "ud"
    folder.mkdir(parents=True)
    (folder / "attack.json").write_text(json.dumps(attack))
    try:
        out = export(run_dir[0], tmp_path / "e", log=lambda line: None)
    finally:
        (folder / "attack.json").unlink()
        folder.rmdir()
        folder.parent.rmdir()
    text = (out / "README.md").read_text()
    assert "## Attacks" in text
    assert "| unlearndiff | 2 | 20% / 10% | 0% / 0% | 70% / 60% | 30% / 25% | 90% / 80% | 10% / 0% |" in text


def test_card_shows_an_eval_report_as_tables(run_dir, tmp_path):
    report = {
        "settings": {"base": "b", "adapter": "a"},
        "suites": {
            "i2p": {
                "base": {"images": 10, "nudenet": {"images_flagged": 6, "detections": 9}},
                "adapter": {"images": 10, "nudenet": {"images_flagged": 1, "detections": 1}},
            }
        },
    }
    (run_dir[0] / "eval").mkdir()
    (run_dir[0] / "eval" / "report.json").write_text(json.dumps(report))
    try:
        out = export(run_dir[0], tmp_path / "e", log=lambda line: None)
    finally:
        (run_dir[0] / "eval" / "report.json").unlink()
        (run_dir[0] / "eval").rmdir()
    text = (out / "README.md").read_text()
    assert "### i2p" in text
    assert "| NudeNet: images with exposed classes | 6 | 1 | −5 |" in text


def test_card_shows_erasure_and_specificity_with_the_plot(run_dir, tmp_path):
    labels = ["a car", "a truck", "an image"]

    def zero_shot(rate, read_as):
        return {"images": 10, "zero_shot": {"rate": rate, "read_as": read_as, "labels": labels}}

    report = {
        "settings": {"base": "b", "adapter": "a"},
        "suites": {
            "concept": {"base": zero_shot(0.9, ["a car"]), "adapter": zero_shot(0.1, ["a car"])},
            "neighbour-a-truck": {
                "base": zero_shot(0.8, ["a truck"]),
                "adapter": zero_shot(0.7, ["a truck"]),
            },
        },
        "plots": ["ripple.png"],
    }
    eval_dir = run_dir[0] / "eval"
    eval_dir.mkdir()
    (eval_dir / "report.json").write_text(json.dumps(report))
    (eval_dir / "ripple.png").write_bytes(b"png")
    try:
        out = export(run_dir[0], tmp_path / "e", log=lambda line: None)
    finally:
        for f in eval_dir.iterdir():
            f.unlink()
        eval_dir.rmdir()
    text = (out / "README.md").read_text()
    assert "| concept | a car | 90.00% | 10.00% | −80.00 pt |" in text
    assert "| neighbour-a-truck | a truck | 80.00% | 70.00% | −10.00 pt |" in text
    assert "`an image`" in text and "![erasure and specificity](ripple.png)" in text
    assert (out / "ripple.png").read_bytes() == b"png"


def test_sample_cli_refuses_the_wrong_base(exported, tmp_path, capsys):
    from lora_grpo.cli import main
    from lora_grpo.tiny import build_tiny_pipeline, tiny_unet

    other = build_tiny_pipeline(tmp_path / "other")
    tiny_unet(cross_attention_dim=48).save_pretrained(other / "unet")
    capsys.readouterr()  # drop the builders' own output
    code = main(
        [
            "sample",
            "--base",
            str(other),
            "--adapter",
            str(exported),
            "--prompt",
            "a cat",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "was trained for a custom UNet (custom:cross32" in err
    assert "this base model is a custom UNet (custom:cross48" in err


def test_export_is_portable_and_its_recipe_runs_elsewhere(run_dir, tmp_path, monkeypatch, capsys):
    """No path of this machine in the card, the recipe or the file metadata; the export carries its prompt
    and anchor files, and `lora-grpo train EXPORT/recipe.yaml` validates from another folder."""
    import shutil

    from lora_grpo.cli import main
    from lora_grpo.runs import write_run_config

    run = tmp_path / "runs" / "tiny-test-1"
    config = load_config(find_recipe("tiny-test"))  # base builtin:tiny-sd, shipped prompt and anchor files
    write_run_config(run, config, base_ref=str(resolve_model_ref(config.model.base)))
    shutil.copytree(run_dir[0] / "adapter", run / "adapter")
    out = tmp_path / "export"
    export(run, out, repo_id="me/tiny-safety", log=lambda line: None)

    machine_paths = [
        str(tmp_path),
        os.environ["LORA_GRPO_HOME"],
        str(Path.home()),
        str(find_recipe("tiny-test").parent),
    ]
    texts = {p.name: p.read_text() for p in out.rglob("*") if p.suffix in (".md", ".yaml", ".txt")}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            texts[f.name] = json.dumps(handle.metadata())
    for name, text in texts.items():
        assert not any(p in text for p in machine_paths), (name, [p for p in machine_paths if p in text])
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (
        recipe["model"]["base"] == "builtin:tiny-sd"
        and recipe["reward"]["clip"]["model"] == "builtin:tiny-clip"
    )
    assert recipe["reward"]["anchors"] == "anchors/compact.yaml" and recipe["output"]["dir"] is None
    assert [s["path"] for s in recipe["prompts"]["sets"]] == [
        "prompts/tiny-unsafe.txt",
        "prompts/tiny-safe.txt",
    ]

    elsewhere = tmp_path / "other-machine" / "export"
    shutil.copytree(out, elsewhere)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    moved = load_config(elsewhere / "recipe.yaml")
    original = load_config(find_recipe("tiny-test"))
    for a, b in zip(moved.prompts.sets, original.prompts.sets, strict=True):
        assert Path(a.path).parent == elsewhere / "prompts"
        assert Path(a.path).read_text() == Path(b.path).read_text()
    assert main(["train", str(elsewhere / "recipe.yaml"), "--dry-run"]) == 0
    assert "nothing loaded, nothing written" in capsys.readouterr().out
    assert not (tmp_path / "work" / "runs").exists()


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "me/bad name", "me/-x-", "me/x..y"])
def test_export_rejects_repo_ids_that_push_would(run_dir, tmp_path, repo):
    with pytest.raises(UserError, match="--repo"):
        export(run_dir[0], tmp_path / "e", repo_id=repo, log=lambda line: None)
    assert not (tmp_path / "e").exists()  # refused before writing anything


def _attention_lora_keys(family: str) -> list[str]:
    """The LoRA keys the product trains on the published UNet of `family`: to_q, to_k, to_v, to_out.0 of
    every attention (the UNet built on the meta device from the shipped config)."""
    from diffusers import UNet2DConditionModel

    from lora_grpo.families import config_folder

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_folder(family) / "unet")
        )
    return [
        f"unet.{name}.lora.down.weight"
        for name, _ in unet.named_modules()
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]


@pytest.mark.parametrize("family, attentions", [("sd1", 16), ("sdxl", 70)])
def test_comfyui_map_covers_the_attention_adapter(family, attentions):
    """Every attention LoRA module of the published UNet (SD 1.5: 16 transformer blocks, SDXL base: 70, each
    with attn1 and attn2) maps to a ComfyUI key; a module the layout does not have is named as unknown."""
    from lora_grpo.hub.kohya import unknown_modules

    keys = _attention_lora_keys(family)
    assert len(keys) == attentions * 2 * 4
    assert unknown_modules(keys, family) == []
    # SDXL's first down block has no attention, SD 1.5's has two (attentions.0 and .1, never .2)
    module = {
        "sd1": "down_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q",
        "sdxl": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    }[family]
    foreign = f"unet.{module}.lora_A.weight"  # peft's key names map like diffusers' lora.down
    assert unknown_modules([*keys, foreign], family) == [module]
    assert unknown_modules([foreign], "custom") == []  # no published layout to check a custom UNet against


def _relabelled_run(run_dir, tmp_path, fingerprint: str) -> Path:
    """A copy of the tiny run whose adapter claims the base architecture `fingerprint`."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    weights = run / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = dict(f.metadata())
    save_file(
        load_file(str(weights)),
        str(weights),
        metadata={**metadata, "lora_grpo.base_architecture": fingerprint},
    )
    return run


def test_export_refuses_a_partial_comfyui_file(run_dir, tmp_path, capsys):
    """The tiny adapter's modules exist in SD 1.5's layout (it exports as sd1) but not all in SDXL's (its
    first down block has attention): labelled SDXL, export stops in one line naming the skipped modules and
    writes nothing."""
    from cli_helpers import one_line_error, run_cli

    from lora_grpo.hub.kohya import unknown_modules

    sd1 = _relabelled_run(run_dir, tmp_path / "sd1", "sd1:cross768:blocks320-640-1280-1280")
    code, _, err = run_cli(["export", sd1, "--out", tmp_path / "out-sd1"], capsys)
    assert code == 0, err
    with safe_open(str(tmp_path / "out-sd1" / "tiny-test_comfyui.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"].startswith("stable-diffusion-v1")
    sdxl = _relabelled_run(run_dir, tmp_path / "sdxl", "sdxl:cross2048:blocks320-640-1280")
    with safe_open(str(sdxl / "adapter" / "pytorch_lora_weights.safetensors"), "pt") as f:
        unknown = unknown_modules(list(f.keys()), "sdxl")
    assert unknown and all(m.startswith("down_blocks.0.attentions.") for m in unknown)
    code, _, err = run_cli(["export", sdxl, "--out", tmp_path / "out-sdxl"], capsys)
    one_line_error(code, err, f"{len(unknown)} LoRA module(s) that ComfyUI's loader does not map for sdxl")
    assert unknown[0] in err and not (tmp_path / "out-sdxl").exists()


def test_card_carries_the_deployment_matrix_worst_cell_and_strength_curve(run_dir, tmp_path):
    """An eval --matrix report in the run's eval/ folder: the card names the worst cell (the highest red rate
    with the adapter), shows the strength curve and the heatmap."""
    from lora_grpo.evaluation.matrix_report import headline_rows

    def cell(sampler, guidance, strength, red_base, red_adapter, kept):
        def side(red, acc):
            return {
                "images": 90,
                "safety": "unsafe",
                "toyworld": {"red_rate": red, "safe_colour_position": acc},
            }

        return {
            "id": f"{sampler}_{guidance}_{strength}",
            "base": "builtin:toyworld-sd",
            "sampler": sampler,
            "steps": 20,
            "guidance": guidance,
            "strength": strength,
            "loras": [],
            "suites": {"toyworld": {"base": side(red_base, 0.95), "adapter": side(red_adapter, kept)}},
        }

    cells = [
        cell("ddim-eta1", 1.0, 1.0, 0.9, 0.02, 0.94),
        cell("euler-a", 7.5, 1.0, 0.95, 0.31, 0.90),
        cell("ddim-eta1", 1.0, 0.5, 0.9, 0.45, 0.96),
        cell("ddim-eta1", 1.0, 0.75, 0.9, 0.12, 0.95),
    ]
    summary = headline_rows(cells)
    summary["plots"] = ["matrix_heatmap.png"]
    assert summary["worst"] == "ddim-eta1_1.0_0.5"  # 0.45: the highest red rate with the adapter
    report = {"settings": {"base": "b", "adapter": "a"}, "suites": cells[0]["suites"], "matrix": summary}
    eval_dir = run_dir[0] / "eval"
    eval_dir.mkdir()
    (eval_dir / "report.json").write_text(json.dumps(report))
    (eval_dir / "matrix_heatmap.png").write_bytes(b"heat")
    try:
        out = export(run_dir[0], tmp_path / "e", log=lambda line: None)
    finally:
        for f in eval_dir.iterdir():
            f.unlink()
        eval_dir.rmdir()
    text = (out / "README.md").read_text()
    assert "### Deployment matrix" in text
    assert (
        "Worst cell: ddim-eta1, 20 steps, CFG 1, strength 0.5, base: red rate 0.900 without the adapter, 0.450"
        in text
    )
    curve = text.split("Strength curve")[1]
    assert (
        curve.index("| 0.5 | 0.450 | 0.960 |")
        < curve.index("| 0.75 | 0.120 | 0.950 |")
        < curve.index("| 1 | 0.020 | 0.940 |")
    )
    assert "| euler-a | 20 | 7.5 | 1 | – | base | 0.950 | 0.310 | 0.950 | 0.900 |" in text
    assert (out / "matrix_heatmap.png").read_bytes() == b"heat" and "(matrix_heatmap.png)" in text
