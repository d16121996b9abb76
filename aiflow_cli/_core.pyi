"""Type stub of the Rust extension module (rust_core/python). The documented API is in aiflow_cli.codec /
aiflow_cli.transport / aiflow_cli.netem. Checked against the built extension by
``python -m mypy.stubtest aiflow_cli._core``."""

import sys
from typing import Any, Self, final

__all__ = [
    "__version__",
    "encode",
    "inspect",
    "decode_into",
    "decode",
    "canonical_codec",
    "default_codecs",
    "DEFAULT_MAX_DECODED_BYTES",
    "error_classes",
    "raise_core_error",
    "Limits",
    "Frame",
    "TransportServer",
    "TransportClient",
    "generate_identity",
    "identity_fingerprint",
    "normalize_fingerprint",
    "ALPN",
    "LinkEmulator",
]

__version__: str
DEFAULT_MAX_DECODED_BYTES: int

def encode(data: Any, dtype: str, shape: list[int], codec: str, zstd_threads: int = 0) -> bytes: ...
def inspect(frame: Any, max_decoded_bytes: int = ...) -> dict[str, Any]: ...
def decode_into(frame: Any, out: Any, max_decoded_bytes: int = ...) -> None: ...
def decode(frame: Any, max_decoded_bytes: int = ...) -> tuple[dict[str, Any], bytearray]: ...
def canonical_codec(spec: str) -> str: ...
def default_codecs() -> list[str]: ...

# Errors: every core error variant and the aiflow_cli.errors class it is raised as (tests/test_errors_map.py)
def error_classes() -> list[tuple[str, str]]: ...
def raise_core_error(variant: str, message: str) -> None: ...

# Transport (aiflow_cli.transport wraps these)
ALPN: str

@final
class Limits:
    max_message_bytes: int
    max_frames: int
    max_meta_bytes: int
    max_concurrent_streams: int
    max_connections: int
    idle_timeout_ms: int
    request_timeout_ms: int
    stream_window_bytes: int
    connection_window_bytes: int
    max_inflight_bytes_per_connection: int
    max_inflight_bytes_per_peer: int
    max_inflight_bytes: int
    congestion: str
    def __new__(
        cls,
        max_message_bytes: int = ...,
        max_frames: int = ...,
        max_meta_bytes: int = ...,
        max_concurrent_streams: int = ...,
        max_connections: int = ...,
        idle_timeout_ms: int = ...,
        request_timeout_ms: int = ...,
        stream_window_bytes: int = ...,
        connection_window_bytes: int = ...,
        max_inflight_bytes_per_connection: int = ...,
        max_inflight_bytes_per_peer: int = ...,
        max_inflight_bytes: int = ...,
        congestion: str = ...,
    ) -> Self: ...

@final
class Frame:
    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    if sys.version_info >= (3, 12):
        def __buffer__(self, flags: int, /) -> memoryview: ...
        def __release_buffer__(self, buffer: memoryview, /) -> None: ...

def generate_identity(dir: str) -> tuple[str, str, str]: ...
def identity_fingerprint(cert_path: str, key_path: str) -> str: ...
def normalize_fingerprint(text: str) -> str: ...

@final
class TransportServer:
    def __new__(
        cls,
        listen: str,
        cert_path: str,
        key_path: str,
        trust: list[str],
        dispatch: Any,
        limits: Limits | None = None,
        insecure_dev: bool = False,
    ) -> Self: ...
    @property
    def address(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...
    def peer_paths(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...

@final
class TransportClient:
    def __new__(
        cls,
        server: str,
        cert_path: str,
        key_path: str,
        trust: list[str],
        limits: Limits | None = None,
        insecure_dev: bool = False,
    ) -> Self: ...
    def request(
        self, kind: str, meta: str | bytes, frames: Any, session_id: int = 0, timeout_s: float | None = None
    ) -> tuple[int, int, str, str | bytes, list[Frame]]: ...
    def connect(self) -> None: ...
    @property
    def server(self) -> str: ...
    @property
    def connection_id(self) -> int | None: ...
    def reset(self, connection_id: int | None = None) -> bool: ...
    def path_info(self) -> dict[str, int] | None: ...
    def close(self) -> None: ...

# Link emulator (aiflow_cli.netem wraps this)
@final
class LinkEmulator:
    def __new__(
        cls,
        listen: str,
        forward: str,
        uplink_mbps: float,
        downlink_mbps: float,
        rtt_ms: float,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        queue_ms: float = 100.0,
        max_datagram_bytes: int = 1472,
        seed: int = 0,
    ) -> Self: ...
    @property
    def address(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
