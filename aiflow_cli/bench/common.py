"""What the benchmarks share: results that turn into JSON. (Timing helpers: :mod:`aiflow_cli.timing`.)"""

from __future__ import annotations

from dataclasses import asdict


class JsonResult:
    """Mixin for a benchmark's result dataclass: ``to_dict()`` gives what ``--json`` prints."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]
