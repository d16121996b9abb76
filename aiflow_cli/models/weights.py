"""Weights: build a model skeleton without memory, load only chosen modules' tensors from safetensors, hash.

A skeleton is built on the ``meta`` device (no storage). :func:`materialize` gives storage to the listed
submodules only, reading exactly their tensors with ``safe_open`` (the rest of the file is never read), and
restores the non-persistent buffers (position ids, rotary frequencies) through the model's own ``_init_weights``.
Tied parameters (GPT-2's ``lm_head`` = ``wte``) are read under the name the checkpoint stores and shared again
when both ends are loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aiflow_cli.errors import ModelError


@dataclass
class WeightFiles:
    """The safetensors file(s) of a checkpoint and which file holds each tensor."""

    files: list[Path]
    key_to_file: dict[str, Path]

    @classmethod
    def from_dir(cls, directory: Path) -> "WeightFiles":
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            key_to_file = {k: directory / v for k, v in weight_map.items()}
            return cls(sorted(set(key_to_file.values())), key_to_file)
        single = directory / "model.safetensors"
        if not single.is_file():
            raise ModelError(f"{directory}: no model.safetensors (or sharded index); aiflow reads safetensors only")
        with safe_open(str(single), "pt") as f:
            keys = list(f.keys())
        return cls([single], {k: single for k in keys})


@dataclass
class LoadStats:
    """What loading read: tensors and bytes (to show a tier reads only its own stages)."""

    tensors_read: int = 0
    bytes_read: int = 0
    keys: list[str] = field(default_factory=list)


def build_skeleton(model_class: type[nn.Module], config) -> nn.Module:
    """Instantiates ``model_class(config)`` on the meta device: every parameter is shape-only, nothing allocated."""
    with torch.device("meta"):
        model = model_class(config)
    return model.eval()


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> all names of the same Parameter object (ties), from the skeleton."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


#: Parameter-name prefixes that older checkpoints store under another name (transformers renames them on load).
LEGACY_PREFIXES = {"lm_head.": "embed_out."}  # GPT-NeoX / Pythia


def _resolve_key(name: str, aliases: list[str], files: WeightFiles, prefix: str) -> str | None:
    """The checkpoint key for a parameter: itself or a tied alias, with or without the base-model prefix, or its
    legacy name (:data:`LEGACY_PREFIXES`)."""
    names = [name] + [a for a in aliases if a != name]
    names += [old + n.removeprefix(new) for n in names for new, old in LEGACY_PREFIXES.items() if n.startswith(new)]
    for n in names:
        candidates = [n]
        if prefix:
            candidates += [n.removeprefix(prefix + "."), f"{prefix}.{n}"]
        for c in candidates:
            if c in files.key_to_file:
                return c
    return None


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    mod._parameters[leaf] = param


def materialize(
    model: nn.Module,
    module_paths: list[str],
    files: WeightFiles,
    *,
    device: torch.device,
    dtype: torch.dtype,
    stats: LoadStats,
) -> None:
    """Gives storage to the named submodules of a meta skeleton and fills them from the checkpoint.

    Floating tensors are cast to ``dtype``; buffers are recomputed by ``model._init_weights``. Raises
    :class:`ModelError` if a parameter is missing from the checkpoint (e.g. names from an older layout).
    """
    groups = _tied_groups(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded: dict[str, nn.Parameter] = {
        n: p for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"
    }
    handles: dict[Path, object] = {}
    try:
        for path in module_paths:
            module = model.get_submodule(path)
            names = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(remove_duplicate=False)]
            if any(b.device.type == "meta" for b in module.buffers()):
                module.to_empty(device=device, recurse=True)
                init = getattr(model, "_init_weights", None)
                for sub in module.modules():
                    if sub._buffers and init is not None:
                        init(sub)
            for name in names:
                if name in loaded:
                    continue
                aliases = groups.get(name, [name])
                shared = next((loaded[a] for a in aliases if a in loaded), None)
                if shared is not None:
                    _set_param(model, name, shared)
                    loaded[name] = shared
                    continue
                key = _resolve_key(name, aliases, files, prefix)
                if key is None:
                    raise ModelError(
                        f"checkpoint has no tensor for parameter {name!r}; it was saved with a different layout "
                        f"than transformers {__import__('transformers').__version__} uses"
                    )
                fpath = files.key_to_file[key]
                if fpath not in handles:
                    handles[fpath] = safe_open(str(fpath), "pt", device="cpu").__enter__()
                t = handles[fpath].get_tensor(key)
                stats.tensors_read += 1
                stats.bytes_read += t.numel() * t.element_size()
                stats.keys.append(key)
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                p = nn.Parameter(t, requires_grad=False)
                _set_param(model, name, p)
                loaded[name] = p
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def loaded_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters that have storage (not meta), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.device.type == "meta" or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def module_param_bytes(model: nn.Module, module_paths: list[str], dtype: torch.dtype) -> int:
    """Bytes the listed submodules' parameters take in ``dtype`` (works on meta skeletons; ties counted once)."""
    seen: set[int] = set()
    total = 0
    for path in module_paths:
        for p in model.get_submodule(path).parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = torch.empty((), dtype=dtype).element_size() if p.is_floating_point() else p.element_size()
            total += p.numel() * size
    return total


_HASH_CHUNK_BYTES = 8 << 20


def _hash_cache_dir() -> Path:
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "hashes"


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so that large checkpoints are hashed once."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = _hash_cache_dir() / f"{key}.txt"
    try:
        remembered = memo.read_text().strip()
        if len(remembered) == 64 and all(c in "0123456789abcdef" for c in remembered):
            return remembered
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # written aside and renamed: a process starting at the same time never reads a half-written memo
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only home only costs re-hashing
    return digest


def model_hash(files: list[Path]) -> str:
    """sha256 over the (name, sha256) of each file: config, weights, pooling configs."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()
