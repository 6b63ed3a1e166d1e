"""The one exception type users see: a one-line message naming the problem and the fix."""

import errno
import re
import shutil
from pathlib import Path

# Storage failures while writing, by errno: a full disk, a quota, a read-only mount, a failing device.
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
}
# How the libraries report them without an OSError: torch.save (accelerate's save_state) raises
# RuntimeError "basic_ios::clear: iostream error" or "PytorchStreamWriter failed ..." with no errno;
# safetensors raises SafetensorError whose text ends "(os error 28)".
_OS_ERROR = re.compile(r"os error (\d+)")
_STREAM_FAILURE = ("basic_ios::clear", "iostream error", "PytorchStreamWriter failed", "unexpected pos")
LOW_SPACE = 1 << 20  # bytes free under which a write failure without an errno is read as a full disk


class UserError(Exception):
    """Bad input from the user (recipe, paths, models). The CLI prints it as one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hub_load_error(what: str, ref: str, err: BaseException) -> UserError:
    """One line for a model that could not be loaded by hub id: names offline mode when it is the cause (the
    libraries' own messages point at a stack trace the user never sees)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return UserError(
            f"{what} '{ref}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
            "unset HF_HUB_OFFLINE (or download it once with network access), or give a local folder"
        )
    reason = first_line(err).split(". Please check out the root cause", 1)[0]
    return UserError(
        f"could not load {what} '{ref}': {reason} (check the hub id, your network or HF_TOKEN, or give a "
        "local folder)"
    )


def write_failure(err: BaseException, path: str | Path | None = None) -> str | None:
    """The cause when `err` is a storage failure while writing (`path`, if known, is checked for free space
    when the library gave no errno); None for any other error."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
        return WRITE_ERRORS[err.errno]
    text = str(err)
    match = _OS_ERROR.search(text)
    if match and int(match.group(1)) in WRITE_ERRORS:
        return WRITE_ERRORS[int(match.group(1))]
    if "No space left on device" in text:
        return WRITE_ERRORS[errno.ENOSPC]
    if isinstance(err, RuntimeError) and any(s in text for s in _STREAM_FAILURE):
        return (
            "no space left on device"
            if path is not None and free_bytes(path) < LOW_SPACE
            else "a write error"
        )
    return None


def free_bytes(path: str | Path) -> int:
    """Free space on the file system holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


class WriteFailed(UserError):
    """A file could not be written (full disk, quota, read-only, I/O error): the message names the path."""

    def __init__(self, message: str, cause: str = "", where: str | Path | None = None):
        super().__init__(message)
        self.cause = cause or message
        self.where = where  # the innermost path being written when it failed
