"""Hub ids download the way transformers does, tested against a loopback stand-in for the hub's file API.

The stand-in (a thread serving 127.0.0.1 only) answers the requests huggingface_hub's ``snapshot_download`` makes:
``GET /api/models/{repo}/revision/{rev}`` (the commit), ``GET /api/models/{repo}/tree/{commit}`` (the files) and
``HEAD``/``GET /{repo}/resolve/{commit}/{file}`` (with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``), for one
tiny random-weight repository; anything else is a 404 ``RepoNotFound``. ``aiflow`` runs as a subprocess with
``HF_ENDPOINT`` pointed at it and a temporary ``HF_HOME`` (huggingface_hub reads both at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlparse

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_repo(d: Path) -> dict[str, bytes]:
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    files["README.md"] = b"not downloaded: aiflow fetches only what it reads\n"
    files["pytorch_model.bin"] = b"never fetched: aiflow reads safetensors only"
    return files


class HubStandIn:
    """A loopback HTTP server speaking the part of the hub API that snapshot_download uses."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                outer.requests.append((self.command, path))
                api = f"/api/models/{REPO}/"
                if path.startswith(api + "revision/"):
                    return self._json(
                        {
                            "id": REPO,
                            "modelId": REPO,
                            "sha": COMMIT,
                            "private": False,
                            "siblings": [{"rfilename": f} for f in outer.files],
                        }
                    )
                if path.startswith(api + "tree/"):
                    return self._json(
                        [
                            {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in outer.files.items()
                        ]
                    )
                prefix = f"/{REPO}/resolve/"
                if path.startswith(prefix):
                    _rev, _, name = path[len(prefix) :].partition("/")
                    if name in outer.files:
                        body = outer.files[name]
                        return self._send(
                            200,
                            body,
                            {
                                "X-Repo-Commit": COMMIT,
                                "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                "Content-Type": "application/octet-stream",
                            },
                            head=head,
                        )
                self._send(
                    404,
                    b'{"error":"Repository not found"}',
                    {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"},
                    head=head,
                )

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def aiflow(args: list[str], *, hf_home: Path, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="400")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "aiflow_cli", *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


PROFILE = [
    "profile",
    REPO,
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--codecs",
    "raw",
    "--seq-len",
    "8",
    "--decode-tokens",
    "2",
    "--json",
]


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo"))


def test_hub_id_is_downloaded_then_used_offline(repo_files, tmp_path):
    with HubStandIn(repo_files) as hub:
        r = aiflow(PROFILE, hf_home=tmp_path, endpoint=hub.url)
        assert r.returncode == 0, r.stderr
        prof = json.loads(r.stdout)
        assert prof["model"] == REPO and prof["family"] == "llama" and len(prof["stages"]) == 5
        fetched = {p.rsplit("/", 1)[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
        assert fetched == {"config.json", "generation_config.json", "model.safetensors"}  # not the README / .bin
    snap = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snap / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    # the server is gone: with HF_HUB_OFFLINE the cached snapshot is used; the model hash is the same
    r2 = aiflow(PROFILE, hf_home=tmp_path, endpoint=hub.url, offline=True)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["model_hash"] == prof["model_hash"]


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_offline_machine_gets_one_line(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    msg = _one_line_error(aiflow(PROFILE, hf_home=tmp_path, endpoint=dead))
    assert f"unknown model '{REPO}'" in msg and "downloading it from " + dead in msg
    msg = _one_line_error(aiflow(PROFILE, hf_home=tmp_path, endpoint=dead, offline=True))
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


def test_a_name_that_is_no_hub_id_is_refused_without_network(monkeypatch):
    from aiflow_cli.errors import ModelError
    from aiflow_cli.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelError, match="not a local directory, and not a Hugging Face hub id"):
        load_model("./no/such/dir")


def test_unknown_repository_is_one_line(repo_files, tmp_path):
    with HubStandIn(repo_files) as hub:
        msg = _one_line_error(aiflow(["profile", "nobody/no-such-model", "--json"], hf_home=tmp_path, endpoint=hub.url))
    assert "unknown model 'nobody/no-such-model'" in msg and "no such repository" in msg
