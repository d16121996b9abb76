"""Per-block profiling of a model on this hardware (`aiflow profile`).

    profile_model(name_or_model, device=, dtype=, batch=, seq_len=, image_size=, decode_tokens=, codecs=,
                  repeats=, warmup=, label=, progress=) -> ModelProfile
    save_profile(profile, path)   # validated on write (re-read through the schema)
    load_profile(path) -> ModelProfile
    check_settings(dtype=, batch=, ...)   # profile_model's settings, checked without torch (`aiflow profile`)

The JSON contract is :mod:`aiflow_cli.profile.schema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from aiflow_cli.errors import InputError
from aiflow_cli.profile.schema import ModelProfile, load_profile

if TYPE_CHECKING:
    from aiflow_cli.profile.profiler import profile_model


def __getattr__(name: str) -> Any:
    # the profiler imports torch and the models: loaded on first use, so reading profiles and plans (aiflow plan)
    # starts without them
    if name == "profile_model":
        from aiflow_cli.profile.profiler import profile_model

        return profile_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The dtypes a model loads in (:func:`aiflow_cli.models.parse_dtype`), by name.
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


def check_settings(
    *,
    dtype: str = "float32",
    batch: int = 1,
    seq_len: Optional[int] = None,
    image_size: Optional[int] = None,
    decode_tokens: Optional[int] = None,
    codecs: Optional[list[str]] = None,
    repeats: int = 1,
    warmup: int = 0,
    calibration_items: Optional[int] = None,
    calibration_tokens: int = 1,
) -> None:
    """The settings of :func:`profile_model` that do not depend on the model, checked without torch or a model
    loaded (the profiler checks them again, with those that do: a model's image size, its cuts); one-line
    :class:`InputError` (:class:`CodecError` for a codec spec that does not parse)."""
    from aiflow_cli import _core

    if str(dtype).lower().removeprefix("torch.") not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    for name, value, low in (
        ("batch", batch, 1),
        ("seq_len", seq_len, 1),
        ("image_size", image_size, 1),
        ("decode_tokens", decode_tokens, 0),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("calibration_items", calibration_items, 1),
        ("calibration_tokens", calibration_tokens, 1),
    ):
        if value is not None and value < low:
            raise InputError(f"{name}={value}: must be >= {low}", param=name)
    for c in codecs or []:
        _core.canonical_codec(c)


def save_profile(profile: ModelProfile, path: str | Path) -> None:
    """Writes a profile as JSON and reads it back through the schema (a file that would not load is an error)."""
    from aiflow_cli.schema import save_model, validate

    validate(ModelProfile, profile.model_dump(mode="json"), source=str(path), kind="model profile")
    save_model(profile, path)
    load_profile(str(path))


__all__ = ["profile_model", "save_profile", "load_profile", "check_settings", "ModelProfile"]
