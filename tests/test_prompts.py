"""Prompt files and the deterministic safe/unsafe mixing."""

from collections import Counter

import pytest

from lora_grpo.config import PromptSetConfig, load_config
from lora_grpo.errors import UserError
from lora_grpo.prompts import PromptSet, epoch_prompts, load_prompt_set, set_schedule


def test_text_and_csv_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n a cat \n\n a dog\n")
    assert load_prompt_set(PromptSetConfig(name="t", path=str(txt))).prompts == ("a cat", "a dog")
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,category\n"a cat, sleeping",animal\na car,vehicle\na dog,animal\n')
    got = load_prompt_set(PromptSetConfig(name="c", path=str(csv), filter={"category": "animal"}))
    assert got.prompts == ("a cat, sleeping", "a dog")
    assert load_prompt_set(PromptSetConfig(name="c", path=str(csv), max_prompts=1)).prompts == (
        "a cat, sleeping",
    )


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="prompt set 'e' is empty"):
        load_prompt_set(PromptSetConfig(name="e", path=str(empty)))
    with pytest.raises(UserError, match="prompt file for set 'm' not found"):
        load_prompt_set(PromptSetConfig(name="m", path=str(tmp_path / "missing.txt")))
    csv = tmp_path / "p.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(UserError, match="has no column 'prompt' \\(columns: text\\)"):
        load_prompt_set(PromptSetConfig(name="c", path=str(csv)))


def test_set_schedule_follows_weights():
    sched = set_schedule([1.0, 1.0], 6)
    assert [s for s, _ in sched] == [0, 1, 0, 1, 0, 1]
    assert [k for _, k in sched] == [0, 0, 1, 1, 2, 2]
    counts = Counter(s for s, _ in set_schedule([3.0, 1.0], 400))
    assert counts == {0: 300, 1: 100}
    # every window of 4 holds the 3:1 share
    sched = [s for s, _ in set_schedule([3.0, 1.0], 40)]
    assert all(sched[i : i + 4].count(1) == 1 for i in range(0, 40, 4))


def test_epoch_prompts_deterministic_and_without_repetition():
    sets = [
        PromptSet("u", "unsafe", tuple(f"u{i}" for i in range(4)), 1.0),
        PromptSet("s", "safe", tuple(f"s{i}" for i in range(6)), 1.0),
    ]
    a = epoch_prompts(sets, 2, 3, seed=0, epoch=0)
    assert a == epoch_prompts(sets, 2, 3, seed=0, epoch=0)
    assert a != epoch_prompts(sets, 2, 3, seed=1, epoch=0)
    assert all(sorted(i for _, i in batch) == [0, 1] for batch in a), "each batch holds both sets"
    flat = [p for batch in a for p, _ in batch]
    unsafe = [p for p in flat if p.startswith("u")]
    assert len(unsafe) == 3 and len(set(unsafe)) == 3, "no repetition within a pass"
    # two processes split the same global stream: together they equal one process with twice the batches
    r0 = epoch_prompts(sets, 2, 1, seed=0, epoch=0, rank=0, world=2)
    r1 = epoch_prompts(sets, 2, 1, seed=0, epoch=0, rank=1, world=2)
    single = epoch_prompts(sets, 2, 2, seed=0, epoch=0)
    assert r0 + r1 == single
    # the next epoch continues the walk: 4 unsafe prompts cover the set exactly once over epochs 0-1
    e1 = epoch_prompts(sets, 2, 2, seed=0, epoch=1)
    walk = [p for batch in single + e1 for p, i in batch if i == 0]
    assert sorted(walk) == ["u0", "u1", "u2", "u3"]


def test_hugging_face_dataset_set(tmp_path):
    """The `dataset:` path goes through datasets.load_dataset; a local dataset folder needs no network."""
    pytest.importorskip("datasets")
    folder = tmp_path / "my-prompts"
    folder.mkdir()
    (folder / "train.csv").write_text(
        "prompt,kind\na red car,safe\nsomething explicit,nsfw\na blue boat,safe\n"
    )
    cfg = PromptSetConfig(
        name="d", safety="safe", dataset=str(folder), column="prompt", filter={"kind": "safe"}
    )
    assert load_prompt_set(cfg).prompts == ("a red car", "a blue boat")
    with pytest.raises(UserError, match="has no column 'text'"):
        load_prompt_set(PromptSetConfig(name="d", dataset=str(folder), column="text"))
    with pytest.raises(UserError, match="could not load dataset"):
        load_prompt_set(PromptSetConfig(name="x", dataset="no-such-org/no-such-dataset"))


def test_categories_and_the_fixed_train_eval_split(tmp_path):
    """I2P-style CSV: `categories` keeps rows labelled with any of them; `part` keeps one side of the split,
    sha256 of the normalised prompt mod 5 (computed here by hand for these prompts)."""
    import hashlib

    from lora_grpo.prompts import prompt_part

    rows = [
        ("a knife fight", "violence"),
        ("A  Knife fight ", "violence, shocking"),  # the same prompt normalised: same side
        ("a bank robbery", "illegal activity"),
        ("a quiet lake", ""),
    ] + [(f"scene {i}", "violence") for i in range(40)]
    csv_file = tmp_path / "i2p.csv"
    csv_file.write_text("prompt,categories\n" + "".join(f'"{p}","{c}"\n' for p, c in rows), encoding="utf-8")

    def side(text):
        digest = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()
        return "eval" if int(digest, 16) % 5 == 0 else "train"

    assert prompt_part("A  Knife fight ") == prompt_part("a knife fight") == side("a knife fight")
    violence = [p.strip() for p, c in rows if "violence" in c]
    by_part = {}
    for part in ("all", "train", "eval"):
        cfg = PromptSetConfig(name="v", path=str(csv_file), categories=["Violence"], part=part)
        by_part[part] = load_prompt_set(cfg).prompts
    assert list(by_part["all"]) == violence
    assert list(by_part["eval"]) == [p for p in violence if side(p) == "eval"]
    assert list(by_part["train"]) == [p for p in violence if side(p) == "train"]
    assert 0 < len(by_part["eval"]) < len(by_part["train"])
    both = PromptSetConfig(name="b", path=str(csv_file), categories=["shocking", "illegal activity"])
    assert load_prompt_set(both).prompts == ("A  Knife fight".strip(), "a bank robbery")
    with pytest.raises(UserError, match="no column 'categories'"):
        plain = tmp_path / "plain.csv"
        plain.write_text("prompt\na cat\n", encoding="utf-8")
        load_prompt_set(PromptSetConfig(name="p", path=str(plain), categories=["violence"]))


def test_a_csv_column_names_the_prompt_each_picture_is_made_from(tmp_path):
    """picture_column: each prompt's img2img picture comes from another prompt (an empty cell: its own); the
    pairs stay aligned through the train/eval split and max_prompts; one picture's prompt a prompt."""
    from lora_grpo.prompts import prompt_part

    rows = [(f"a shape {i}", f"a red shape {i}" if i % 3 else "") for i in range(30)]
    csv_file = tmp_path / "pictures.csv"
    csv_file.write_text("prompt,picture\n" + "".join(f"{p},{q}\n" for p, q in rows), encoding="utf-8")
    expected = {p: (q or p) for p, q in rows}
    for part in ("all", "train", "eval"):
        cfg = PromptSetConfig(
            name="n", safety="unsafe", path=str(csv_file), picture_column="picture", part=part
        )
        loaded = load_prompt_set(cfg)
        assert list(loaded.prompts) == [p for p, _ in rows if part == "all" or prompt_part(p) == part]
        assert list(loaded.pictures) == [expected[p] for p in loaded.prompts]
    first = load_prompt_set(
        PromptSetConfig(name="n", path=str(csv_file), picture_column="picture", max_prompts=3)
    )
    assert first.pictures == ("a shape 0", "a red shape 1", "a red shape 2")
    assert load_prompt_set(PromptSetConfig(name="n", path=str(csv_file))).pictures is None
    # each set says which picture each of its prompts starts from; another set may give the same prompt another
    assert first.picture_of("a shape 1") == "a red shape 1" and first.picture_of("a shape 0") == "a shape 0"
    assert PromptSet("red", "unsafe", ("a red shape 1",), 1.0).picture_of("a red shape 1") == "a red shape 1"
    other = PromptSet("other", "safe", ("a shape 1",), 1.0, ("a blue shape 1",))
    assert other.picture_of("a shape 1") == "a blue shape 1"
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,picture\na shape 1,a red shape 1\na shape 1,a blue shape 1\n", encoding="utf-8")
    with pytest.raises(UserError, match="'a shape 1' has two pictures' prompts in set 'n'"):
        load_prompt_set(PromptSetConfig(name="n", path=str(twice), picture_column="picture"))
    with pytest.raises(UserError, match="no column 'pic'"):
        load_prompt_set(PromptSetConfig(name="n", path=str(csv_file), picture_column="pic"))
    with pytest.raises(UserError, match="picture_column"):
        PromptSetConfig(name="n", path="prompts.txt", picture_column="picture")
    # a set's own share of groups from pictures travels with it
    always = PromptSetConfig(name="n", path=str(csv_file), picture_column="picture", img2img=1.0)
    assert load_prompt_set(always).img2img == 1.0 and first.img2img is None
    with pytest.raises(UserError, match=r"prompts.sets\[n\].img2img"):
        PromptSetConfig(name="n", path=str(csv_file), img2img=1.5)


def test_a_sets_own_img2img_share_needs_the_recipes_img2img():
    from lora_grpo.recipe_files import find_recipe

    sets = "prompts.sets=[{name: u, safety: unsafe, path: prompts/tiny_unsafe.txt, img2img: 1.0}]"
    with pytest.raises(UserError, match=r"prompts.sets\[\].img2img.*set its fraction > 0"):
        load_config(find_recipe("tiny-test"), [sets])
    with pytest.raises(UserError, match="train.advantage_std.*none do"):
        load_config(find_recipe("tiny-test"), ["train.advantage_std=picture-batch"])


def test_prompts_longer_than_the_text_window_are_found_by_token_count():
    """'a' is one token: 75 of them fill the 77-token window with the start and end tokens, 76 do not."""
    from lora_grpo.prompts import TEXT_WINDOW, long_prompt_note, too_long

    fits, cut = " ".join(["a"] * (TEXT_WINDOW - 2)), " ".join(["a"] * (TEXT_WINDOW - 1))
    assert too_long(["a cat", fits, cut, cut + " b"]) == [cut, cut + " b"]
    note = long_prompt_note("set 'x'", ["a cat", cut, fits])
    assert note.startswith("note: 1 of 3 prompts in set 'x' are longer than the text encoder's 77 tokens")
    assert "(the first: 'a a a" in note and note.count("\n") == 0
    assert long_prompt_note("set 'x'", ["a cat", fits]) is None


def test_train_dry_run_new_recipe_eval_and_the_trainer_report_long_prompts(tmp_path, capsys):
    from cli_helpers import run_cli

    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import Trainer

    long = "a photo of " + " and ".join(["a red circle"] * 30)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{long}\na blue square\n")
    sets = f"prompts.sets=[{{name: p, safety: unsafe, path: {prompts}}}, {{name: s, safety: safe, path: {prompts}}}]"
    code, out, err = run_cli(["train", "tiny-test", sets, "--dry-run", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert (
        f"note: 1 of 2 prompts in set 'p' are longer than the text encoder's 77 tokens and are cut there (the first: '{long[:87]}..."
        in out
    )
    code, out, err = run_cli(
        [
            "new-recipe",
            "no-circles",
            "--remove",
            "a circle",
            "--instead",
            "a square",
            "--prompts",
            prompts,
            "--out",
            tmp_path,
        ],
        capsys,
    )
    assert code == 0 and "note: 1 of 2 prompts in unsafe.txt are longer" in out
    args = [
        "eval",
        "--base",
        "builtin:toyworld-sd",
        "--suite",
        prompts,
        "--max-prompts",
        "1",
        "--out",
        tmp_path / "e",
    ]
    args += ["--clip", "builtin:toyworld-clip", "--anchors", "toyworld", "--no-nudenet", "--steps", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "note: 1 of 1 prompts in suite p are longer" in out, err
    lines = []
    Trainer(load_config(find_recipe("tiny-test"), [sets]), tmp_path / "t", log=lines.append)
    assert any(line.startswith("note: 1 of 2 prompts in set 's' are longer") for line in lines)
