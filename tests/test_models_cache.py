"""The per-machine model cache (built-ins, the smollm2 conversion): concurrent processes build once, the others
wait and read the finished files; a failed build leaves nothing; an invalid entry is rebuilt."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from aiflow_cli.models.builtins import create_once


def _slow_build(tmp: Path, log: str) -> None:
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one holds the lock
    (tmp / "model.safetensors").write_bytes(b"weights")


def _worker(cache: str, log: str, out) -> None:
    import os

    os.environ["AIFLOW_CACHE_DIR"] = cache
    d = create_once("thing", lambda tmp: _slow_build(tmp, log))
    out.put((str(d), (d / "model.safetensors").read_bytes()))


def test_concurrent_processes_build_once_and_read_complete_files(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    log = str(tmp_path / "log")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), log, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert Path(log).read_text() == "built\n"
    assert {r for r in results} == {(str(tmp_path / "cache" / "models" / "thing"), b"weights")}
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == ["thing"]


def test_failed_build_leaves_nothing_and_invalid_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("AIFLOW_CACHE_DIR", str(tmp_path))

    def broken(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        create_once("thing", broken)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    d = create_once("thing", lambda tmp: (tmp / "model.safetensors").write_bytes(b"v1"))
    assert create_once("thing", lambda tmp: (tmp / "model.safetensors").write_bytes(b"v2")) == d
    assert (d / "model.safetensors").read_bytes() == b"v1"  # complete and valid: not rebuilt
    create_once("thing", lambda tmp: (tmp / "model.safetensors").write_bytes(b"v2"), valid=lambda p: False)
    assert (d / "model.safetensors").read_bytes() == b"v2"  # not valid (e.g. a newer GGUF package): rebuilt


def test_a_builtin_built_on_two_machines_has_the_same_hash(tmp_path, monkeypatch):
    """Plans and peers compare model hashes, so identical tensors must give identical files (safetensors writes
    its metadata map in a random order: more than one key made two builds differ about half of the time)."""
    from aiflow_cli.models import load_model

    hashes = set()
    for i in range(8):
        monkeypatch.setenv("AIFLOW_CACHE_DIR", str(tmp_path / f"machine{i}"))
        hashes.add(load_model("builtin:gpt2-tiny").model_hash)
    assert len(hashes) == 1


def test_a_cache_written_with_unordered_metadata_is_rebuilt(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from aiflow_cli.models import load_model
    from aiflow_cli.models.builtins import cache_dir

    monkeypatch.setenv("AIFLOW_CACHE_DIR", str(tmp_path))
    want = load_model("builtin:gpt2-tiny").model_hash
    weights = cache_dir() / "gpt2-tiny" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "aiflow_builtin": "gpt2-tiny"})
    assert load_model("builtin:gpt2-tiny").model_hash == want


def test_a_half_written_hash_memo_is_not_trusted(tmp_path, monkeypatch):
    from aiflow_cli.models.weights import _hash_cache_dir, file_sha256

    monkeypatch.setenv("AIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    want = file_sha256(f)
    for memo in _hash_cache_dir().iterdir():
        memo.write_text(want[:10])  # what a reader saw while another process was writing it
    assert file_sha256(f) == want
    assert [p.name for p in _hash_cache_dir().iterdir() if p.name.endswith(".tmp")] == []
