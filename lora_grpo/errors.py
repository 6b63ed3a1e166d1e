"""The one exception type users see: a one-line message naming the problem and the fix."""


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
