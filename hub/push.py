"""`lora-grpo push DIR --repo user/name`: create the repo if needed and upload the export in one commit.

The token comes from --token, then HF_TOKEN, then the cached `hf auth login`; it is never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_grpo.errors import UserError
from lora_grpo.hub.export import check_repo_id
from lora_grpo.hub.manifest import verify_export
from lora_grpo.models import ADAPTER_WEIGHTS

REQUIRED = (ADAPTER_WEIGHTS, "README.md")


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return token


def _explain(err: Exception, repo_id: str) -> UserError:
    """One line for the failures users meet; the token never appears in it."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return UserError(
            "the Hugging Face Hub rejected the token (401): check it, or log in again with `hf auth login`"
        )
    if isinstance(err, HfHubHTTPError) and status == 403:
        return UserError(
            f"permission denied for {repo_id} (403): the token cannot write there (a repo owned by someone else, "
            "or a read-only token)"
        )
    if isinstance(err, HfHubHTTPError):
        return UserError(f"the Hugging Face Hub refused the upload to {repo_id} (HTTP {status})")
    return UserError(
        f"could not reach the Hugging Face Hub ({type(err).__name__}): check your network or HF_ENDPOINT"
    )


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload safety LoRA (lora_grpo)",
) -> str:
    """Upload an export folder; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir() or any(not (folder / f).is_file() for f in REQUIRED):
        raise UserError(
            f"{folder} is not an export (needs {', '.join(REQUIRED)}): run `lora-grpo export` first"
        )
    verify_export(folder)  # every file as exported, before the Hub is contacted
    check_repo_id(repo_id)
    # HF_ENDPOINT read now, not at import, so a mirror or test server set later is honoured
    api = HfApi(token=resolve_token(token), endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
        )
    except UserError:
        raise
    except Exception as err:  # the hub client raises HTTP and transport errors of many types
        raise _explain(err, repo_id) from None
    return str(info.commit_url)
