"""How a profile is measured (:class:`ProfileSettings`): the one home of :func:`profile_model`'s settings, their
defaults and the checks that need no model, torch-free so that `aiflow profile` refuses a bad flag before it
imports torch or loads the model. The profiler checks again, with what does need the model (its cuts, whether it
generates)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from aiflow_cli.errors import InputError
from aiflow_cli.profile.calibration import DEFAULT_TOKENS

#: The dtypes a model loads in (:func:`aiflow_cli.models.parse_dtype`), by name.
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
#: KV-cache length of the profiled decode step of a generating model (``decode_tokens=None``).
DEFAULT_DECODE_TOKENS = 32


@dataclass(frozen=True)
class ProfileSettings:
    """The settings of one profile; times are ms, sizes bytes.

    ``device``/``dtype``: where and in what the model loads (a loaded model keeps its own). ``seq_len`` /
    ``image_size`` default to the model's (32 tokens for LMs and encoders, 1 decoder token + the encoder's image
    size for captioners). ``decode_tokens``: KV-cache length of the profiled decode step (None:
    :data:`DEFAULT_DECODE_TOKENS` for generating models; 0 skips it). ``codecs``: None for
    :func:`aiflow_cli.codec.default_codecs`; ``raw`` is always included. ``repeats`` timed and ``warmup``
    untimed runs per measurement. Fidelity: on the first ``calibration_items`` items of the calibration set
    (None: all), with ``calibration_tokens`` generated tokens per item for generating models; lossy codecs are
    measured at the cuts in ``fidelity_cuts`` (None: every cut; ``"every:N"``: cuts 0, N, 2N, ... and the last).
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    seq_len: Optional[int] = None
    image_size: Optional[int] = None
    decode_tokens: Optional[int] = None
    codecs: Optional[tuple[str, ...]] = None
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    calibration_items: Optional[int] = None
    calibration_tokens: int = DEFAULT_TOKENS
    fidelity_cuts: Optional[tuple[int, ...] | str] = None

    @classmethod
    def of(cls, base: Optional["ProfileSettings"] = None, **changes: Any) -> "ProfileSettings":
        """``base`` (default: the defaults) with ``changes`` (field names; lists become tuples), checked."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise InputError(f"unknown profile setting {unknown[0]!r} (settings: {', '.join(sorted(fields))})")
        for name in ("codecs", "fidelity_cuts"):
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        return dataclasses.replace(base or cls(), **changes).check()

    def check(self) -> "ProfileSettings":
        """Refuses, in one line, a setting that is wrong whatever the model (:class:`InputError` naming the
        parameter; :class:`CodecError` for a codec spec that does not parse); returns ``self``."""
        from aiflow_cli import _core

        if str(self.dtype).lower().removeprefix("torch.") not in DTYPES:
            raise InputError(f"dtype={self.dtype!r}: use float32, float16 or bfloat16", param="dtype")
        for name, low in (
            ("batch", 1),
            ("seq_len", 1),
            ("image_size", 1),
            ("decode_tokens", 0),
            ("repeats", 1),
            ("warmup", 0),
            ("calibration_items", 1),
            ("calibration_tokens", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                raise InputError(f"{name}={value}: must be >= {low}", param=name)
        for c in self.codecs or ():
            _core.canonical_codec(c)
        self.fidelity_step()
        return self

    def fidelity_step(self) -> Optional[int]:
        """N of ``fidelity_cuts="every:N"`` (None for a list of cuts, or all); :class:`InputError` if malformed."""
        spec = self.fidelity_cuts
        if not isinstance(spec, str):
            return None
        try:
            step = int(spec.removeprefix("every:"))
        except ValueError:
            step = 0
        if not spec.startswith("every:") or step < 1:
            raise InputError(
                f"fidelity_cuts={spec!r}: give cut indices like 0,4,8, or every:N with N >= 1", param="fidelity_cuts"
            )
        return step


__all__ = ["ProfileSettings", "DTYPES", "DEFAULT_REPEATS", "DEFAULT_WARMUP", "DEFAULT_DECODE_TOKENS"]
