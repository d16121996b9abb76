"""Per-block profiling of a model on this hardware (`aiflow profile`).

    profile_model(name_or_model, settings=None, label=, progress=, **changes) -> ModelProfile
    ProfileSettings(device=, dtype=, batch=, ...)   # how to profile; .check() needs no torch (`aiflow profile`)
    save_profile(profile, path)   # validated on write (re-read through the schema)
    load_profile(path) -> ModelProfile

The JSON contract is :mod:`aiflow_cli.profile.schema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiflow_cli.profile.schema import ModelProfile, load_profile
from aiflow_cli.profile.settings import ProfileSettings

if TYPE_CHECKING:
    from aiflow_cli.profile.profiler import profile_model


def __getattr__(name: str) -> Any:
    # the profiler imports torch and the models: loaded on first use, so reading profiles and plans (aiflow plan)
    # starts without them
    if name == "profile_model":
        from aiflow_cli.profile.profiler import profile_model

        return profile_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_profile(profile: ModelProfile, path: str | Path) -> None:
    """Writes a profile as JSON and reads it back through the schema (a file that would not load is an error)."""
    from aiflow_cli.schema import save_model, validate

    validate(ModelProfile, profile.model_dump(mode="json"), source=str(path), kind="model profile")
    save_model(profile, path)
    load_profile(str(path))


__all__ = ["profile_model", "save_profile", "load_profile", "ProfileSettings", "ModelProfile"]
