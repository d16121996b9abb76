"""Prometheus metrics of a serving tier: `aiflow serve --metrics HOST:PORT` (docs/metrics.md lists them).

A :class:`TierMetrics` watches one :class:`~aiflow_cli.runtime.node.TierNode` (it is the node's ``observer``:
the node reports each request it handles, each failure and each state it encodes) and serves ``/metrics`` over
HTTP on the address it is given, and only there. Every name starts with ``aiflow_``; times are in seconds and
sizes in bytes, as Prometheus recommends. Gauges of the moment (sessions, KV cache, the QUIC path to the next
tier) are read when scraped. Needs the ``prometheus-client`` package (``pip install 'aiflow[metrics]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

from aiflow_cli.errors import InputError, TransportError

if TYPE_CHECKING:
    from aiflow_cli.runtime.node import StepResult, TierNode
    from aiflow_cli.runtime.wire import PackedState
    from aiflow_cli.transport import Message, Server

#: Histogram buckets of durations (s): 100 us (a codec call) to 60 s (a long prefill on a slow tier).
SECONDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets of compression ratios (raw bytes / bytes on the wire).
RATIOS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
#: Buckets of batch sizes (sessions in one forward pass).
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def parse_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0: any free) -> (host, port); one-line InputError otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InputError(
            f"metrics={address!r}: give HOST:PORT to serve /metrics on (e.g. 127.0.0.1:9100; port 0: any free)",
            param="metrics",
        )
    return host, int(port)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise InputError(
            "metrics needs the prometheus-client package: pip install 'aiflow[metrics]'", param="metrics"
        ) from None
    return prometheus_client


class TierMetrics:
    """The metrics of ``node``'s tier in a registry of their own (several tiers may share a process);
    ``server``: the transport server in front of it, whose connections from the previous tier(s) are described."""

    def __init__(self, node: "TierNode", server: Optional["Server"] = None):
        pc = _prometheus()
        self.node = node
        self.server = server
        self.tier = node.tier
        self.registry = pc.CollectorRegistry(auto_describe=True)
        reg = self.registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> Any:
            return pc.Counter(name, doc, list(labels), registry=reg)

        def histogram(name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]) -> Any:
            return pc.Histogram(name, doc, list(labels), buckets=tuple(buckets), registry=reg)

        self.requests = counter(
            "aiflow_requests",
            "Requests (session steps) this tier handled, by message kind and phase; the steps of a batched message "
            "count one each, as kind infer.",
            ["tier", "kind", "phase"],
        )
        self.batch_messages = counter(
            "aiflow_batch_messages", "Batched messages (infer_batch) this tier received.", ["tier"]
        )
        self.errors = counter(
            "aiflow_request_errors", "Requests answered with an error, by error class.", ["tier", "error_class"]
        )
        self.request_seconds = histogram(
            "aiflow_request_duration_seconds",
            "Time to answer one request, the tiers behind included.",
            ["tier", "phase"],
            SECONDS,
        )
        self.compute_seconds = histogram(
            "aiflow_stage_compute_seconds", "Time this tier's stages computed, per request.", ["tier"], SECONDS
        )
        self.codec_seconds = histogram(
            "aiflow_codec_seconds",
            "Codec time of this tier per request (encode: its output; decode: its input).",
            ["tier", "op"],
            SECONDS,
        )
        self.link_bytes = counter(
            "aiflow_link_bytes",
            "Payload bytes (frames, 8 per token) per link and direction (up: towards the cloud), as this tier sees them.",
            ["tier", "link", "direction"],
        )
        self.compression = histogram(
            "aiflow_compression_ratio",
            "Raw tensor bytes / encoded bytes of each state this tier sends.",
            ["tier", "link"],
            RATIOS,
        )
        self.batch_size = histogram(
            "aiflow_batch_size", "Sessions computed in one forward pass of this tier's stages.", ["tier"], BATCHES
        )
        reg.register(_Gauges(self))
        self._http: Optional[tuple[Any, Any]] = None

    # -- what the node reports (TierNode.observer) --------------------------------------------------------------
    def handled(self, request: Any, env: "Message", reply: "Message", result: "StepResult", seconds: float) -> None:
        """One request answered: ``request`` is the decoded message, ``env``/``reply`` the transport messages."""
        self._step(env.kind, getattr(request, "phase", ""), result, seconds)
        tokens = 8 * result.tokens.numel() if result.tokens is not None else 0  # as Timings counts them
        self._incoming(request.sender, env, reply, tokens)

    def handled_batch(
        self, request: Any, env: "Message", reply: "Message", outs: list["StepResult | BaseException"], seconds: float
    ) -> None:
        """A batched message (``request``, an InferBatch) answered: each of its session steps counts as the request
        it would be sent alone (``outs``: each step's result or error, in step order), the message once."""
        tier = self.tier
        self.batch_messages.labels(tier).inc()
        tokens = 0
        for step, out in zip(request.steps, outs):
            if isinstance(out, BaseException):
                self.requests.labels(tier, step.infer.KIND, step.infer.phase).inc()
                self.errors.labels(tier, type(out).__name__).inc()
                continue
            self._step(step.infer.KIND, step.infer.phase, out, seconds)
            tokens += 8 * out.tokens.numel() if out.tokens is not None else 0
        self._incoming(request.sender, env, reply, tokens)

    def _step(self, kind: str, phase: str, result: "StepResult", seconds: float) -> None:
        """One session step answered: its request, duration, this tier's compute and codec times, and the bytes
        it sent on to the next tier."""
        tier = self.tier
        self.requests.labels(tier, kind, phase).inc()
        self.request_seconds.labels(tier, phase).observe(seconds)
        mine = result.timings.tiers.get(tier)
        if mine is not None:
            self.compute_seconds.labels(tier).observe(mine.compute_ms / 1e3)
            self.codec_seconds.labels(tier, "encode").observe(mine.encode_ms / 1e3)
            self.codec_seconds.labels(tier, "decode").observe(mine.decode_ms / 1e3)
        out = result.timings.links.get(self.node.link) if self.node.link else None
        if out is not None:
            self.link_bytes.labels(tier, self.node.link, "up").inc(out.bytes_up)
            self.link_bytes.labels(tier, self.node.link, "down").inc(out.bytes_down)

    def _incoming(self, sender: str, env: "Message", reply: "Message", tokens: int) -> None:
        """The bytes of one message from the previous tier (``env``) and of its ``reply`` (+ 8 per token)."""
        incoming = f"{sender}-{self.tier}"
        self.link_bytes.labels(self.tier, incoming, "up").inc(sum(len(f) for f in env.frames))
        self.link_bytes.labels(self.tier, incoming, "down").inc(sum(len(f) for f in reply.frames) + tokens)

    def batched(self, sessions: int) -> None:
        """One forward pass of this tier's stages ran for ``sessions`` sessions (runtime/batching.py)."""
        self.batch_size.labels(self.tier).observe(sessions)

    def failed(self, env: "Message", error: BaseException) -> None:
        """A request answered with ``error``."""
        self.requests.labels(self.tier, env.kind, "").inc()
        self.errors.labels(self.tier, type(error).__name__).inc()

    def packed(self, raw_bytes: int, packed: "PackedState") -> None:
        """A state of ``raw_bytes`` encoded for the next tier."""
        if packed.nbytes:
            self.compression.labels(self.tier, self.node.link).observe(raw_bytes / packed.nbytes)

    # -- the HTTP endpoint --------------------------------------------------------------------------------------
    def serve(self, address: str) -> str:
        """Serves ``/metrics`` on ``address`` (HOST:PORT); returns the address bound (``host:port``)."""
        host, port = parse_listen(address)
        try:
            server, thread = _prometheus().start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise TransportError(
                f"metrics={address!r}: cannot listen there: {e.strerror or e}", param="metrics"
            ) from None
        self._http = (server, thread)
        bound_host, bound_port = server.server_address[:2]
        return f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None


class _Gauges:
    """Figures of the moment, read at each scrape: sessions, KV cache, the QUIC paths from the previous tier(s)
    and to the next one."""

    def __init__(self, m: TierMetrics):
        self.m = m

    def describe(self) -> list:
        return []  # names are only known per scrape (the QUIC ones exist while a connection is open)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        node, tier = self.m.node, self.m.tier
        sessions = GaugeMetricFamily(
            "aiflow_active_sessions", "Sessions holding a KV cache on this tier.", labels=["tier"]
        )
        sessions.add_metric([tier], len(node.sessions))
        kv = GaugeMetricFamily("aiflow_kv_cache_bytes", "Bytes of KV caches (and step inputs) held.", labels=["tier"])
        kv.add_metric([tier], node.sessions.total_bytes)
        yield sessions
        yield kv
        if self.m.server is not None:
            yield from self._incoming(tier, self.m.server.peer_paths())
        info = node.next.path_info() if node.next is not None else None
        if info is None:
            return
        labels, values = ["tier", "link"], [tier, node.link]

        def gauge(name: str, doc: str, value: float) -> Any:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> Any:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge(
            "aiflow_quic_rtt_seconds",
            "Smoothed round-trip time of the connection to the next tier.",
            info["rtt_us"] / 1e6,
        )
        yield gauge("aiflow_quic_min_rtt_seconds", "Smallest round-trip time seen on it.", info["min_rtt_us"] / 1e6)
        yield gauge("aiflow_quic_congestion_window_bytes", "Its congestion window.", info["cwnd_bytes"])
        yield gauge("aiflow_quic_mtu_bytes", "Largest UDP payload its path carries (MTU discovery).", info["mtu_bytes"])
        # per connection: they restart from 0 when the tier reconnects (Prometheus takes that as a counter reset)
        yield counter(
            "aiflow_quic_sent_packets", "Packets sent on the connection to the next tier.", info["sent_packets"]
        )
        yield counter("aiflow_quic_lost_packets", "Packets lost on it.", info["lost_packets"])
        yield counter("aiflow_quic_congestion_events", "Congestion events on it.", info["congestion_events"])

    @staticmethod
    def _incoming(tier: str, paths: list[dict[str, Any]]) -> Iterable[Any]:
        """The connections of the devices (or edges) served: summed and summarised, not one series per peer,
        so that hundreds of devices make a handful of series."""
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, doc: str, labels: list[str], *samples: tuple[list[str], float]) -> Any:
            g = GaugeMetricFamily(name, doc, labels=["tier", *labels])
            for values, v in samples:
                g.add_metric([tier, *values], v)
            return g

        yield gauge(
            "aiflow_quic_peer_connections",
            "Open QUIC connections from the peers this tier serves.",
            [],
            ([], len(paths)),
        )
        if not paths:
            return
        rtts = [p["rtt_us"] / 1e6 for p in paths]
        stats = (["min"], min(rtts)), (["mean"], sum(rtts) / len(rtts)), (["max"], max(rtts))
        yield gauge(
            "aiflow_quic_peer_rtt_seconds", "Smoothed RTT of those connections: min, mean, max.", ["stat"], *stats
        )
        for key, what in (("sent_packets", "sent"), ("lost_packets", "lost")):
            doc = f"Packets {what} on those connections, summed (drops when a connection closes)."
            yield gauge(f"aiflow_quic_peer_{key}", doc, [], ([], sum(p[key] for p in paths)))
