"""The transport's CLI verbs: keygen writes an identity and prints its fingerprint; netem runs for a duration."""

from __future__ import annotations

import json
import subprocess
import sys

from aiflow_cli.transport import Identity


def aiflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiflow_cli", *args], capture_output=True, text=True, timeout=60)


def test_keygen_prints_the_fingerprint_and_refuses_to_overwrite(tmp_path):
    r = aiflow("keygen", "--out", str(tmp_path / "node"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fingerprint"] == Identity.load(tmp_path / "node").fingerprint
    r = aiflow("keygen", "--out", str(tmp_path / "node"))
    assert r.returncode == 3 and "refusing to overwrite" in r.stderr


def test_netem_runs_for_a_duration(tmp_path):
    r = aiflow(
        "netem", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--link", "lte", "--duration-s", "0.3", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"uplink", "downlink", "flows"}
