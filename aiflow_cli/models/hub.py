"""Hugging Face hub ids: found in the local hub cache, else downloaded the way transformers does.

``huggingface_hub.snapshot_download`` fetches only what aiflow reads (config, safetensors, tokenizer, generation
and sentence-transformers configs) into the standard cache (``HF_HOME``), with its progress bars on stderr.
``HF_HUB_OFFLINE=1`` is honoured (then only the cache is used) and ``HF_ENDPOINT`` chooses the server. Every
failure (offline machine, unknown repository, gated model, no safetensors) is one :class:`ModelError` line.
"""

from __future__ import annotations

import os
from pathlib import Path

from aiflow_cli.errors import ModelError

#: The files of a repository aiflow uses; weights are read from safetensors only (never pickles).
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/*",
]

_TRUE = {"1", "on", "yes", "true"}


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read now, and as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _reason(e: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "the repository is gated: accept its terms on the hub and log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return "the hub has no such repository (or it is private)"
    if isinstance(e, RevisionNotFoundError):
        return "the hub has no such revision"
    cause: BaseException | None = e
    while cause is not None:  # huggingface_hub wraps network failures: name the root one
        if any(w in type(cause).__name__ for w in ("Connect", "Timeout", "Network")):
            return f"cannot reach the hub ({type(cause).__name__}: {' '.join(str(cause).split())[:120]})"
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def hub_dir(name: str) -> Path:
    """The local snapshot directory of hub id ``name`` (downloading it unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    unknown = f"unknown model {name!r}: not a builtin (aiflow models lists them), not a local directory"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"{unknown}, and not a Hugging Face hub id (owner/name)") from None
    try:
        local = Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
        if _complete(local):
            return local
    except Exception:  # noqa: BLE001, S110 - not cached (or not a valid id): decided below
        pass
    if offline():
        raise ModelError(f"{unknown}, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set: no download)")
    endpoint = constants.ENDPOINT
    try:
        path = Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, HTTP, validation: all one line
        raise ModelError(f"{unknown}, and downloading it from {endpoint} failed: {_reason(e)}") from None
    if not (path / "config.json").is_file():
        raise ModelError(f"{name}: the hub repository has no config.json; aiflow loads transformers checkpoints")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{name}: the hub repository has no safetensors weights; aiflow reads safetensors only")
    return path
