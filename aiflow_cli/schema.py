"""Loading typed, versioned data files (profiles, plans, link profiles) with errors a user can act on.

Every data file aiflow reads is a pydantic model with a ``schema_version`` field. :func:`load_model` reads JSON or
TOML, validates it, and turns any problem into a :class:`SchemaError` that names the file, the field and the fix.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from aiflow_cli.errors import InputError, SchemaError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every schema: unknown fields are refused (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {err['msg']}")
    more = len(e.errors()) - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def validate(cls: type[M], data: Any, *, source: str, kind: str) -> M:
    """Validates already-parsed data as ``cls``; ``source`` names where it came from in the error."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: a {kind} must be a JSON/TOML object, got {type(data).__name__}")
    expected = cls.model_fields.get("schema_version")
    if expected is not None and expected.default is not None:
        got = data.get("schema_version")
        if got != expected.default:
            raise SchemaError(
                f"{source}: {kind} schema_version is {got!r}, this aiflow reads version {expected.default}; "
                f"regenerate the file with this version of aiflow"
            )
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SchemaError(f"{source}: not a valid {kind}: {describe_validation_error(e)}") from None


def read_data_file(path: str | Path) -> Any:
    """Parses a .json or .toml file; missing or malformed files raise :class:`InputError` naming the path."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SchemaError(f"{p}: not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None


def load_model(cls: type[M], path: str | Path, *, kind: str) -> M:
    """Reads and validates a data file as ``cls``."""
    return validate(cls, read_data_file(path), source=str(path), kind=kind)


def save_model(obj: BaseModel, path: str | Path) -> None:
    """Writes a model as indented JSON (atomically: a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
