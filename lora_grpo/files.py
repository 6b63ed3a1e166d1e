"""Writing files so that nothing is lost or hidden: folders built beside their target and renamed into place
whole, and files that end up with the permissions a plain write would give them.

Libraries that write through a temporary file (safetensors, `tempfile.mkdtemp`) leave mode 0600 / 0700
behind; a ComfyUI or web server running as another user could then not read a published LoRA. `match_umask`
gives such a path the mode `open()` / `mkdir()` would have given it under the user's umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_grpo.errors import WriteFailed, write_failure


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: str | Path) -> None:
    """Give `path` (and everything under it, for a folder) the mode a plain write would: 0666 / 0777 less the
    umask. Symbolic links are left alone."""
    mask = current_umask()
    root = Path(path)
    paths = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for item in paths:
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        os.chmod(item, (0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask)


@contextlib.contextmanager
def folder_built_beside(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden empty folder next to `target`; when the block ends without an error the folder is renamed
    to `target` with umask permissions (an empty folder there is taken; one with files is replaced whole only
    with `replace`). On any error or interrupt the hidden folder is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None  # the replaced folder, parked here until the new one is in place
    try:
        yield tmp
        match_umask(tmp)
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()  # an empty folder holds nothing to keep
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():  # put the earlier folder back
            os.replace(old / target.name, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn a storage failure inside the block into WriteFailed: "no space left on device writing PATH". The
    outermost block names the path (a checkpoint, not the hidden folder it was being built in)."""
    try:
        yield
    except Exception as err:
        cause = err.cause if isinstance(err, WriteFailed) else write_failure(err, path)
        if cause is None:
            raise
        where = err.where if isinstance(err, WriteFailed) else path
        raise WriteFailed(f"{cause} writing {what + ' ' if what else ''}{path}", cause, where) from None


def write_atomically(path: str | Path, write) -> None:
    """`write(tmp_path)` into a hidden file beside `path`, then rename it into place (umask permissions); on
    any failure the hidden file is removed and `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            write(tmp)
            match_umask(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
