"""Built-in models: transformers configs in realistic and tiny sizes with random weights from a fixed seed.

A built-in is created once per machine under ``$AIFLOW_CACHE_DIR/models/<name>/`` (default
``~/.cache/aiflow/models``) as ``config.json`` + ``model.safetensors``, so that every process (device, edge, cloud)
reads identical weights and each can load only its own stages' tensors. Creation is atomic and locked: concurrent
processes wait for the first one and then read its files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig, VisionEncoderDecoderConfig, ViTConfig

BUILTIN_SEED = 1234


@dataclass(frozen=True)
class Builtin:
    """One built-in: its name (without ``builtin:``), what it is, and its config factory."""

    name: str
    description: str
    make_config: Callable[[], PretrainedConfig]


def _gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, n_positions: int, cross: bool = False) -> GPT2Config:
    return GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        add_cross_attention=cross,
        is_decoder=cross,
    )


def _vit(hidden: int, layers: int, heads: int, inter: int, image: int, patch: int, labels: int = 2) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        image_size=image,
        patch_size=patch,
        num_labels=labels,
    )


def _captioner(vit: ViTConfig, gpt2: GPT2Config) -> VisionEncoderDecoderConfig:
    cfg = VisionEncoderDecoderConfig(encoder=vit.to_dict(), decoder=gpt2.to_dict())
    cfg.decoder_start_token_id = gpt2.bos_token_id
    cfg.pad_token_id = gpt2.pad_token_id
    cfg.eos_token_id = gpt2.eos_token_id
    return cfg


def _llama(
    hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, positions: int, tie: bool
) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )


def _bert(hidden: int, layers: int, heads: int, inter: int, vocab: int) -> BertConfig:
    return BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=512,
    )


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("gpt2", "GPT-2 124M shape (12 x 768, vocab 50257)", lambda: _gpt2(12, 768, 12, 50257, 1024)),
        Builtin("gpt2-tiny", "GPT-2 layout, 4 x 64, vocab 1000", lambda: _gpt2(4, 64, 4, 1000, 256)),
        Builtin(
            "vit-gpt2-captioner",
            "image captioner: ViT-base/16 224px encoder -> GPT-2 124M decoder with cross-attention",
            lambda: _captioner(_vit(768, 12, 12, 3072, 224, 16), _gpt2(12, 768, 12, 50257, 1024, cross=True)),
        ),
        Builtin(
            "captioner-tiny",
            "captioner layout: ViT 2 x 64 (32px/8) -> GPT-2 3 x 64 with cross-attention",
            lambda: _captioner(_vit(64, 2, 4, 128, 32, 8), _gpt2(3, 64, 4, 1000, 128, cross=True)),
        ),
        Builtin(
            "llama-160m",
            "Llama layout, 160M shape (12 x 768, vocab 32000)",
            lambda: _llama(768, 3072, 12, 12, 12, 32000, 2048, tie=False),
        ),
        Builtin(
            "llama-tiny",
            "Llama layout, 4 x 64, 4 heads / 2 KV heads (GQA), tied embeddings, vocab 1000",
            lambda: _llama(64, 128, 4, 4, 2, 1000, 256, tie=True),
        ),
        Builtin(
            "bert-tiny",
            "BERT encoder 2 x 128 (bert-tiny shape), vocab 1000, mean-pooled embeddings",
            lambda: _bert(128, 2, 2, 512, 1000),
        ),
        Builtin(
            "vit-tiny",
            "ViT classifier 4 x 64, 32px images, patch 8, 10 classes",
            lambda: _vit(64, 4, 4, 128, 32, 8, labels=10),
        ),
    ]
}


def cache_dir() -> Path:
    """Where built-ins are created: ``$AIFLOW_CACHE_DIR/models`` (default ``~/.cache/aiflow/models``)."""
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "models"


def state_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each shared (tied) tensor stored once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.contiguous()
    return out


#: The only metadata written into a created ``model.safetensors``. safetensors stores metadata as a hash map whose
#: order changes from run to run, so a second key would make the file's bytes (and the model hash that plans and
#: peers check) differ between two machines that hold identical tensors.
WEIGHTS_METADATA = {"format": "pt"}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Writes ``model``'s tensors to ``path`` byte-for-byte reproducibly (same tensors, same file)."""
    from safetensors.torch import save_file

    save_file(state_to_save(model), str(path), metadata=dict(WEIGHTS_METADATA))


def weights_reproducible(directory: Path) -> bool:
    """Whether ``directory/model.safetensors`` was written by :func:`save_weights` (older caches carried a second
    metadata key in a random order and are rebuilt)."""
    from safetensors import safe_open

    try:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return f.metadata() == WEIGHTS_METADATA
    except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
        return False


def create_once(name: str, build: Callable[[Path], None], *, valid: Callable[[Path], bool] | None = None) -> Path:
    """``cache_dir()/name``, created by ``build(tmpdir)`` if it is missing (or not ``valid``): built in a temporary
    directory and renamed into place under a lock, so concurrent processes wait for the first one and then read
    its complete files, and an interrupted build leaves nothing behind."""
    target = cache_dir() / name

    def ready() -> bool:
        return (target / "model.safetensors").is_file() and (valid is None or valid(target))

    if ready():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_builtin(name: str, model_class_for: Callable[[PretrainedConfig], type]) -> Path:
    """The directory of built-in ``name``, creating its config and weights (seed :data:`BUILTIN_SEED`) if needed."""
    spec = BUILTINS[name]

    def build(tmp: Path) -> None:
        config = spec.make_config()
        torch.manual_seed(BUILTIN_SEED)
        model = model_class_for(config)(config).eval()
        model.config.save_pretrained(tmp)
        save_weights(model, tmp / "model.safetensors")

    return create_once(name, build, valid=weights_reproducible)
