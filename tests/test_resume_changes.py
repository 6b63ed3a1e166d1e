"""A resume keeps the run's settings: a change outside the documented list is refused naming each key, the
recorded and the given value; --change-settings applies it for real (the optimizer's learning rate too) and
run.json, config.yaml and the card say what ran."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_helpers import one_line_error, run_cli

from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe
from lora_grpo.runs import FREE_ON_RESUME, check_resume_changes, setting_changes


def test_setting_changes_lists_each_differing_key_in_schema_order():
    recorded = load_config(find_recipe("tiny-test"))
    given = load_config(find_recipe("tiny-test"), ["train.epochs=9", "train.learning_rate=0.5", "seed=3"])
    assert setting_changes(recorded, given) == [
        ("seed", 0, 3),
        ("train.epochs", 3, 9),
        ("train.learning_rate", 0.001, 0.5),
    ]
    assert setting_changes(recorded, recorded) == []


def test_only_the_documented_keys_change_freely():
    free = [(key, 1, 2) for key in FREE_ON_RESUME]
    assert check_resume_changes("run", free, allowed=False, next_epoch=4) == []  # nothing to record
    lr = ("train.learning_rate", 0.001, 0.5)
    with pytest.raises(UserError, match=r"train.learning_rate 0.001 -> 0.5\); .* from epoch 5") as err:
        check_resume_changes("run", [*free, lr], allowed=False, next_epoch=4)
    assert "\n" not in str(err.value) and "train.epochs" not in str(err.value).split(";")[0]
    assert check_resume_changes("run", [*free, lr], allowed=True, next_epoch=4) == [lr]
    with pytest.raises(UserError, match="cannot change lora.rank"):
        check_resume_changes("run", [("lora.rank", 4, 8)], allowed=True, next_epoch=4)


@pytest.mark.slow
def test_a_changed_learning_rate_is_refused_then_applied_for_real(tmp_path, capsys):
    run = tmp_path / "run"
    first = ["train", "tiny-test", "train.epochs=1", "evaluate.every=0", "--out", run]
    assert run_cli(first, capsys)[0] == 0
    resume = ["train", "tiny-test", "--resume", run, "train.epochs=2", "train.learning_rate=0.5"]
    code, _, err = run_cli(resume, capsys)
    one_line_error(code, err, "would change settings it was trained with (train.learning_rate 0.001 -> 0.5)")
    code, out, err = run_cli([*resume, "--change-settings"], capsys)
    assert code == 0, err
    assert "settings changed from epoch 2: train.learning_rate 0.001 -> 0.5" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["lr"]) for r in rows] == [(1, 0.001), (2, 0.5)]  # the optimizer got it
    changes = json.loads((run / "run.json").read_text())["changes"]
    assert changes == [{"from_epoch": 2, "key": "train.learning_rate", "was": 0.001, "now": 0.5}]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == 0.5
    assert run_cli(["export", run, "--out", tmp_path / "e"], capsys)[0] == 0
    card = (tmp_path / "e" / "README.md").read_text()
    assert "from epoch 2: `train.learning_rate` 0.001 -> 0.5" in card
