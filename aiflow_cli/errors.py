"""The one exception tree of aiflow.

Every failure a user can cause or meet is an :class:`AiflowError`; the CLI turns it into a one-line message and
the exit code of its class (no tracebacks). The Rust core raises these same classes: its error enum is mapped
onto them in ``rust_core/python/src/errors.rs`` by class name, so this module is the single source of truth
(``tests/test_errors_map.py`` checks every variant).
"""

from __future__ import annotations


class AiflowError(Exception):
    """Base class of every aiflow error. ``exit_code`` is what the CLI exits with.

    ``param``: the library parameter(s) the error is about, when the caller can fix it by changing them (a name,
    or names joined by ``,``). The message names them as ``name=value``, ``name[key]=value`` or `` `name` ``; the
    CLI rewrites those to its own flags (:mod:`aiflow_cli.commands.flags`), so the library never names a flag.
    """

    exit_code: int = 1

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class InputError(AiflowError):
    """Bad input from the user: a file that does not exist, a malformed option, a bad shape."""

    exit_code = 3


class SchemaError(InputError):
    """A profile, plan or link file that does not match its schema (names the file, the field and the fix)."""


class CodecError(AiflowError):
    """A codec spec that cannot be parsed, or a tensor the codec cannot encode (dtype, size)."""

    exit_code = 4


class FrameError(CodecError):
    """A frame that fails validation: bad magic, version, dtype, shape, checksum, size limit, zstd bomb."""


class ModelError(AiflowError):
    """A model that cannot be found, loaded or cut into stages."""

    exit_code = 5


class PlanError(AiflowError):
    """No plan satisfies the limits, or a plan does not fit the model/profiles it is used with."""

    exit_code = 6


class TransportError(AiflowError):
    """A network failure: connect, send, receive, a peer that closed, a protocol violation."""

    exit_code = 7


class PeerRejected(TransportError):
    """The peer's identity (certificate fingerprint), ALPN, plan or model hash was not accepted."""

    exit_code = 8


class Timeout(TransportError):
    """A request or connection did not complete within its deadline."""

    exit_code = 9


class LimitExceeded(TransportError):
    """A message, frame count or stream count beyond a configured limit."""

    exit_code = 10


class RemoteError(AiflowError):
    """The remote tier failed while serving a request; the message is the remote's."""

    exit_code = 11


__all__ = [
    "AiflowError",
    "InputError",
    "SchemaError",
    "CodecError",
    "FrameError",
    "ModelError",
    "PlanError",
    "TransportError",
    "PeerRejected",
    "Timeout",
    "LimitExceeded",
    "RemoteError",
]
