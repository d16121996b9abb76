"""`make build` must not rewrite the loaded extension in place: a running aiflow maps aiflow_cli/_core*.so, and a
write into that inode changes the code under it (the process dies with SIGSEGV/SIGBUS at its next call into the
core; seen as an intermittent segfault of `aiflow profile` while the extension was rebuilt)."""

from __future__ import annotations

import mmap
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_core_unshare_keeps_a_mapped_extension_intact(tmp_path: Path) -> None:
    pkg = tmp_path / "aiflow_cli"
    pkg.mkdir()
    so = pkg / "_core.abi3.so"
    old = b"old build " * 1000
    so.write_bytes(old)
    with open(so, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:  # as the loader maps it
        inode = so.stat().st_ino
        subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "core-unshare"], check=True)
        assert so.read_bytes() == old and so.stat().st_ino != inode
        # What a build or a plain copy does next: write the new extension into the file at that path.
        with open(so, "r+b") as w:
            w.write(b"new build " * 1000)
        assert mapped[:] == old  # the running process still sees the code it loaded
    assert not list(pkg.glob("*.unshare"))
