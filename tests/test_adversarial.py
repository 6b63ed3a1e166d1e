"""train.adversarial: attacks on the current policy feed the `adversarial` unsafe set; the round's prompts (and
concept-inversion's token) reach sampling, live in the checkpoint, and a resumed run ends where one run does."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lora_grpo.adversarial import (
    ADVERSARIAL_SET,
    NEWEST_SET,
    Adversary,
    adversarial_set,
    newest_set,
    round_passes,
    round_targets,
    round_token,
)
from lora_grpo.checkpoint import read_trainer_state
from lora_grpo.config import AdversarialConfig, load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe
from lora_grpo.train import Trainer
from lora_grpo.train_command import build_callbacks

FAST = ["train.epochs=2", "output.checkpoint_every=1", "train.optimizer=adamw", "output.sample_grid_every=0"]


def _adversarial(method: str, *extra: str) -> list[str]:
    keys = [f"train.adversarial.method={method}", "train.adversarial.every=1", "train.adversarial.targets=2"]
    keys += ["train.adversarial.tokens=2", "train.adversarial.steps=2", "train.adversarial.ban=[nude]"]
    return [*FAST, *keys, *extra]


def _trainer(run_dir, overrides) -> Trainer:
    config = load_config(find_recipe("tiny-test"), overrides)
    return Trainer(config, run_dir, log=lambda line: None, callbacks=build_callbacks(config))


def test_round_targets_rotate_and_the_set_holds_the_newest_finds():
    unsafe = ["u0", "u1", "u2", "u3", "u4"]
    assert round_targets(unsafe, 2, 0) == ["u0", "u1"]
    assert round_targets(unsafe, 2, 2) == ["u4", "u0"]  # from position 4, wrapping
    assert round_targets(["only"], 3, 5) == ["only"]
    cfg = AdversarialConfig(method="mma", keep=2, weight=0.5)
    before = adversarial_set(cfg, unsafe, Adversary())
    assert (before.name, before.safety, before.prompts, before.weight) == (
        ADVERSARIAL_SET,
        "unsafe",
        tuple(unsafe),
        0.5,
    )
    pool = {"<concept-1>": [0.5, -1.0], "<concept-2>": [2.0, 0.0]}
    adversary = Adversary(found=["a", "b", "c"], embeddings=pool, rounds=2)
    assert adversarial_set(cfg, unsafe, adversary).prompts == ("b", "c")
    # the newest round alone (2 targets a round: 2 prompts), for the check; the unsafe prompts before it
    newest = newest_set(AdversarialConfig(method="mma", targets=2), unsafe, adversary)
    assert (newest.name, newest.safety, newest.prompts) == (NEWEST_SET, "unsafe", ("b", "c"))
    assert newest_set(
        AdversarialConfig(method="mma", targets=9), ["u0"], Adversary(["x", "y"], rounds=2)
    ).prompts == ("y",)  # a round finds one prompt for each of its min(targets, unsafe prompts) targets
    assert newest_set(cfg, unsafe, Adversary()).prompts == tuple(unsafe)
    again = Adversary.from_state(adversary.state())
    assert (again.found, again.embeddings, again.rounds) == (["a", "b", "c"], pool, 2)
    assert [round_token(r) for r in range(2)] == list(pool)  # one token a round
    older = Adversary.from_state({"found": ["a <concept> x"], "embedding": [1.0, 2.0], "rounds": 1})
    assert older.embeddings == {"<concept>": [1.0, 2.0]}  # a checkpoint of one token overwritten each round


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.adversarial.every=0"], "train.adversarial.every"),
        (
            ["train.adversarial.method=mma", "prompts.sets=[{name: s, safety: safe, path: x.txt}]"],
            "add an unsafe",
        ),
        (
            [
                "train.adversarial.method=mma",
                "prompts.sets=[{name: adversarial, safety: unsafe, path: x.txt}]",
            ],
            "rename the prompt set",
        ),
        (
            [
                "train.adversarial.method=mma",
                "evaluate.sets=[{name: adversarial-new, safety: unsafe, path: x.txt}]",
            ],
            "rename the prompt set ['adversarial-new']",
        ),
    ],
)
def test_bad_adversarial_settings_are_one_line(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(find_recipe("tiny-test"), overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mma", "concept-inversion"])
def test_adversarial_rounds_feed_the_set_and_resume_exactly(method, tmp_path):
    """Two epochs, a round at the end of each (before its check): the set holds the rounds' prompts (no banned
    word; inversion's use its token, installed in the pipeline's tokenizer), each epoch's checkpoint records the
    round that ended it, and one epoch + resume trains the same adapter bit for bit."""
    from accelerate.state import AcceleratorState

    whole = _trainer(tmp_path / "whole", _adversarial(method))
    assert whole.prompt_sets[-1].prompts == (
        "an explicit photo",
        "a nude figure",
        "a violent scene",
        "a shocking image",
    )
    whole.run()
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # the round's passes, by hand: mma reads the text encoder alone; concept-inversion draws 2 pictures for
    # each of 2 targets (8 steps, CFG doubles) and takes 2 steps of 2 pictures x 4 noise draws
    by_hand = {"mma": 0, "concept-inversion": 2 * 2 * 8 * 2 + 2 * 2 * 4}[method]
    assert [r["unet_passes_adversarial"] for r in rows] == [by_hand, by_hand]
    assert round_passes(whole.config, 2) == by_hand
    assert rows[1]["unet_passes_sampling"] == rows[0]["unet_passes_sampling"]  # the epoch's own, unchanged
    found = whole.prompt_sets[-1].prompts
    assert len(found) == 4 and found[:2] != whole.prompt_sets[0].prompts[:2]
    assert whole.eval_sets[-1].prompts == found[2:]  # the check after round 2 reads round 2 alone
    assert rows[1]["eval/adversarial-new/steering_reward"] != rows[1]["eval/adversarial/steering_reward"]
    assert all("explicit" not in re.sub(r"<concept-\d+>", "", p) and "nude" not in p for p in found)
    first_round = read_trainer_state(tmp_path / "whole" / "checkpoints" / "epoch_000001")["adversarial"]
    state = read_trainer_state(tmp_path / "whole" / "checkpoints" / "epoch_000002")
    assert first_round["rounds"] == 1 and first_round["found"] == list(found[:2])  # sampled by epoch 2
    assert state["adversarial"]["rounds"] == 2 and state["adversarial"]["found"] == list(found)
    if method == "concept-inversion":  # each round its own token, all of them installed
        assert all("<concept-1>" in p for p in found[:2]) and all("<concept-2>" in p for p in found[2:])
        pool = state["adversarial"]["embeddings"]
        assert list(pool) == ["<concept-1>", "<concept-2>"] and first_round["embeddings"] == {
            "<concept-1>": pool["<concept-1>"]
        }
        for token, vector in pool.items():
            row = whole.pipe.text_encoder.get_input_embeddings().weight[
                whole.pipe.tokenizer.convert_tokens_to_ids(token)
            ]
            assert torch.equal(row, torch.tensor(vector, dtype=row.dtype))
        assert pool["<concept-1>"] != pool["<concept-2>"]
    AcceleratorState._reset_state()

    first = _trainer(tmp_path / "split", _adversarial(method, "train.epochs=1"))
    first.run()
    AcceleratorState._reset_state()
    resumed = _trainer(tmp_path / "split", _adversarial(method))
    resumed.run(tmp_path / "split" / "checkpoints" / "epoch_000001")
    assert resumed.prompt_sets[-1].prompts == found and resumed.eval_sets[-1].prompts == found[2:]
    a = load_file(str(tmp_path / "whole" / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
