"""files.py and the storage-failure reading in errors.py: folders that appear whole, umask permissions, the
three forms a full disk takes in our libraries, and JSON-lines files with a torn last line."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from lora_grpo.errors import UserError, WriteFailed, write_failure
from lora_grpo.files import folder_built_beside, match_umask, write_text_atomically, writing
from lora_grpo.tracking import MetricsLog, read_jsonl


@pytest.mark.parametrize(
    "err, cause",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (OSError(errno.EIO, "Input/output error"), "input/output error"),
        (
            Exception(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            ),
            "no space left on device",
        ),
        (Exception("I/O error: Disk quota exceeded (os error 122)"), "disk quota exceeded"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "a write error"),
        (RuntimeError("basic_ios::clear: iostream error"), "a write error"),  # plenty of space where it wrote
        (OSError(errno.ENOENT, "No such file"), None),
        (ValueError("bad value"), None),
    ],
)
def test_write_failures_are_read_from_every_form(err, cause, tmp_path):
    assert write_failure(err, tmp_path) == cause


def test_writing_names_the_outermost_path_and_lets_other_errors_through(tmp_path):
    with pytest.raises(WriteFailed, match=r"^no space left on device writing checkpoint /c$"):
        with writing("/c", "checkpoint"), writing("/c/.tmp/adapter", "the adapter"):
            raise OSError(errno.ENOSPC, "full")
    with pytest.raises(KeyError):
        with writing(tmp_path):
            raise KeyError("x")


def test_a_folder_appears_whole_with_umask_modes_or_not_at_all(tmp_path):
    old = os.umask(0o027)
    try:
        with folder_built_beside(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
            os.chmod(tmp / "a.txt", 0o600)
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
        assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o640
        with pytest.raises(FileExistsError):  # a folder with files is replaced only when asked
            with folder_built_beside(tmp_path / "out"):
                pass
        with pytest.raises(RuntimeError):
            with folder_built_beside(tmp_path / "out", replace=True) as tmp:
                (tmp / "b.txt").write_text("b")
                raise RuntimeError("interrupted")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden folder left
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]  # the earlier folder as it was
        with folder_built_beside(tmp_path / "out", replace=True) as tmp:
            (tmp / "b.txt").write_text("b")
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]  # replaced whole
    finally:
        os.umask(old)


def test_match_umask_and_atomic_text(tmp_path):
    path = tmp_path / "f.json"
    write_text_atomically(path, "{}")
    os.chmod(path, 0o600)
    match_umask(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_torn_last_line_is_dropped_and_a_damaged_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(text.encode() + b'{"epoch": 3, "lo')  # a crash (or a full disk) mid-append
    assert read_jsonl(path) == rows
    MetricsLog(path).truncate(2)  # what a resume does: the file is whole again
    assert path.read_text() == text
    MetricsLog(path).write({"epoch": 3})
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2, 3]
    path.write_text(text.replace('"loss": 0.5}', '"loss": 0.5'))
    with pytest.raises(UserError, match=r"metrics.jsonl line 1 is not JSON"):
        read_jsonl(path)
