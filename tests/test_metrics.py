"""Prometheus metrics (`aiflow serve --metrics HOST:PORT`) and W3C trace context: /metrics scraped during a real
3-process run moves, with aiflow_ names in seconds and bytes; bad addresses are refused in one line; a tier
continues the trace of the request it handles in the message it sends on (and in OpenTelemetry when configured)."""

from __future__ import annotations

import socket
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_support import three_tier_plan

from aiflow_cli.errors import InputError, TransportError
from aiflow_cli.runtime import protocol, tracing
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.metrics import TierMetrics, parse_listen
from aiflow_cli.runtime.node import TierNode, next_session_id
from aiflow_cli.transport import Client, Identity, Message, PeerInfo, Server

MODEL = "builtin:gpt2-tiny"


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of ``http://address/metrics``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("aiflow_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.parametrize("bad", ["9100", "localhost", ":9100", "host:port", "127.0.0.1:70000", ""])
def test_a_bad_metrics_address_is_refused_in_one_line(bad):
    with pytest.raises(InputError, match="give HOST:PORT"):
        parse_listen(bad)


def test_an_address_in_use_is_refused_in_one_line():
    node = types.SimpleNamespace(tier="edge", link="edge-cloud", sessions=None, next=None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = "127.0.0.1:%d" % busy.getsockname()[1]
        with pytest.raises(TransportError, match=f"metrics='{taken}': cannot listen there"):
            TierMetrics(node).serve(taken)


def test_metrics_addresses_parse():
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9100") == ("::1", 9100)


def test_traceparent_continues_the_trace_and_travels_in_infer():
    with tracing.span("request") as root:
        assert tracing.current() == root
        trace_id, span_id, flags = tracing.parse(root)
        with tracing.span("edge", root) as child:
            assert tracing.parse(child)[0] == trace_id and tracing.parse(child)[1] != span_id
        assert tracing.current() == root
    assert tracing.current() == ""
    assert tracing.parse(tracing.child_of("00-zz-bad")) is not None  # a malformed parent starts a new trace
    infer = protocol.Infer("h", "device", "prefill", 0, (), traceparent=root)
    assert protocol.decode(protocol.encode(infer)).traceparent == root
    assert protocol.decode(protocol.encode(protocol.Infer("h", "device", "prefill", 0, ()))).traceparent == ""


def test_a_tier_continues_the_trace_in_what_it_sends_on(tmp_path):
    """The edge relays a step to a recording 'cloud': the traceparent it sends is a new span of the device's trace."""
    plan = three_tier_plan(MODEL, tmp_path / "plan.json", codec="raw")
    edge_id, cloud_id = Identity.generate(tmp_path / "edge"), Identity.generate(tmp_path / "cloud")
    seen: list[str] = []

    def cloud(msg: Message, peer: PeerInfo) -> Message:
        seen.append(protocol.decode(msg).traceparent)
        return protocol.error_reply("cloud", InputError("recorded"))

    with (
        Server(identity=cloud_id, trust=[edge_id], handler=cloud) as srv,
        Client(srv.address, identity=edge_id, trust=[cloud_id]) as to_cloud,
    ):
        edge = TierNode(plan, "edge", next_client=to_cloud)
        sent = tracing.child_of("")
        relay = protocol.Infer(edge.plan_hash, "device", "prefill", edge.stages.stop, (), traceparent=sent)
        reply = edge.handle(protocol.encode(relay), PeerInfo("127.0.0.1:1", "fp", 1))
    assert reply.kind == "error" and "recorded" in reply.meta["message"]
    (got,) = seen
    assert tracing.parse(got)[0] == tracing.parse(sent)[0]  # the same trace
    assert tracing.parse(got)[1] != tracing.parse(sent)[1]  # the edge's own span


def otel_exporter():
    """An in-memory exporter of the spans recorded from now on: OpenTelemetry's SDK set up on first use (a tracer
    provider can be set once per process), a processor added to it after."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_spans_are_recorded_in_opentelemetry_when_it_is_configured():
    exporter = otel_exporter()
    with tracing.span("aiflow request", tier="device") as root:
        with tracing.span("aiflow edge prefill", root, tier="edge") as child:
            pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request, edge = spans["aiflow request"], spans["aiflow edge prefill"]
    trace_id = tracing.parse(root)[0]
    assert f"{request.context.trace_id:032x}" == trace_id == f"{edge.context.trace_id:032x}"
    assert edge.parent.span_id == request.context.span_id
    assert tracing.parse(child)[1] == f"{edge.context.span_id:016x}"
    assert edge.attributes["tier"] == "edge"


@pytest.mark.parametrize("otel", [False, True])
def test_each_step_of_a_batched_message_has_its_own_span(otel):
    """A middle tier (gpt2-tiny: device [0:2) edge [2:4) cloud [4:7)) gets one batched message of 4 prefills, each
    with its own request's traceparent (one without: it starts a trace): each step goes on to the cloud in one
    batched message with a new span of its own trace; with OpenTelemetry configured, each is a recorded span."""
    from aiflow_cli.bench.decode import fixed_plan
    from aiflow_cli.models import load_stages
    from aiflow_cli.runtime.batching import BatchSettings
    from aiflow_cli.runtime.wire import pack_state

    exporter = otel_exporter() if otel else None
    if not otel and tracing._otel_tracer() is not None:
        pytest.skip("OpenTelemetry is configured in this process (the other case runs)")
    full = load_stages(MODEL)
    plan = fixed_plan(full, (2, 4))
    cloud = TierNode(plan, "cloud", model=full, batching=BatchSettings(16))
    seen: list[protocol.InferBatch] = []

    class ToCloud:
        def request(self, msg, timeout_s):
            seen.append(protocol.decode(msg))
            return cloud.handle(msg, PeerInfo("127.0.0.1:0", "edge", 1))

        def reset_after(self, error):
            pass

    edge = TierNode(plan, "edge", model=full, next_client=ToCloud(), batching=BatchSettings(16))
    parents = [tracing.child_of("") for _ in range(3)] + [""]
    steps, frames = [], []
    for i, tp in enumerate(parents):
        state = full.run(full.make_inputs(seq_len=3 + 2 * i, seed=i), range(1, 2))
        packed = pack_state(state, full.roles(state), "raw")
        infer = protocol.Infer(edge.plan_hash, "device", "prefill", 2, packed.tensors, 4, False, traceparent=tp)
        steps.append(protocol.BatchStep(i, infer))
        frames += packed.frames
    batch = protocol.InferBatch(edge.plan_hash, "device", tuple(steps))
    reply = edge.handle(protocol.encode(batch, frames), PeerInfo("127.0.0.1:0", "device", 1))
    got = protocol.expect_reply(reply, protocol.ResultBatch)
    assert all(isinstance(r, protocol.Result) and r.tokens for r in got.results), got
    (sent,) = seen  # one message on, for the 4 sessions
    ids = [next_session_id(("device", i)) for i in range(4)]  # each session under its id for the next tier
    assert isinstance(sent, protocol.InferBatch) and [s.session_id for s in sent.steps] == ids
    out = [tracing.parse(s.infer.traceparent) for s in sent.steps]
    assert all(o is not None for o in out)
    for parent, (trace_id, span_id, _) in zip(parents[:3], out):
        assert tracing.parse(parent)[0] == trace_id and tracing.parse(parent)[1] != span_id  # its own trace
    assert out[3][0] not in {tracing.parse(p)[0] for p in parents[:3]}  # no parent: a new trace
    assert len({o[1] for o in out}) == 4  # a span per step
    if exporter is not None:
        spans = [s for s in exporter.get_finished_spans() if s.name == "aiflow edge prefill"]
        assert len(spans) == 4
        by_span = {f"{s.context.span_id:016x}": s for s in spans}
        for tp, (trace_id, span_id, _) in zip(parents, out):
            s = by_span[span_id]  # the span the step went on in
            assert f"{s.context.trace_id:032x}" == trace_id and s.attributes["tier"] == "edge"
            if tp:
                assert f"{s.parent.span_id:016x}" == tracing.parse(tp)[1]
            else:
                assert s.parent is None


def test_metrics_of_a_real_three_process_run(tmp_path):
    three_tier_plan(MODEL, tmp_path / "plan.json", codec="int8")
    metrics = {"edge": "127.0.0.1:0", "cloud": "127.0.0.1:0"}
    with LocalCluster(tmp_path / "plan.json", tmp_path, metrics=metrics) as c:
        edge, cloud = (c.servers[t].ready.metrics for t in ("edge", "cloud"))
        assert edge.startswith("127.0.0.1:") and cloud.startswith("127.0.0.1:")
        before = scrape(edge)
        assert total(before, "aiflow_requests_total", tier="edge") == 0
        with c.pipeline(timeout_s=60) as p:
            r = p.run(text="metrics", max_new_tokens=4)
            assert r.tokens.shape[1] == 4
        # a malformed request: an error by class
        with Client(c.addresses["edge"], identity=c.keys["device"], trust=c.fingerprints(), timeout_s=20) as cli:
            bad = cli.request(Message("infer", {"v": protocol.PROTOCOL_VERSION, "plan_hash": "x"}))
            assert bad.kind == "error"
        e, k = scrape(edge), scrape(cloud)
    # the device sends a prefill and 3 decode steps through the edge to the cloud
    assert total(e, "aiflow_requests_total", tier="edge", kind="infer", phase="prefill") == 1
    assert total(e, "aiflow_requests_total", tier="edge", kind="infer", phase="decode") == 3
    assert total(k, "aiflow_requests_total", tier="cloud", kind="infer") == 4
    assert total(e, "aiflow_request_errors_total", tier="edge", error_class="TransportError") == 1
    for samples, tier in ((e, "edge"), (k, "cloud")):
        assert total(samples, "aiflow_stage_compute_seconds_count", tier=tier) == 4
        assert 0 < total(samples, "aiflow_stage_compute_seconds_sum", tier=tier) < 60
        assert total(samples, "aiflow_codec_seconds_count", tier=tier, op="decode") == 4
        assert total(samples, "aiflow_request_duration_seconds_count", tier=tier) == 4
        assert total(samples, "aiflow_batch_size_count", tier=tier) == 4
        assert ("aiflow_active_sessions", (("tier", tier),)) in samples
        assert ("aiflow_kv_cache_bytes", (("tier", tier),)) in samples
    # bytes per link and direction, as each side sees them: the edge's upload to the cloud is what the cloud got
    up = total(e, "aiflow_link_bytes_total", link="edge-cloud", direction="up")
    assert up > 0 and up == total(k, "aiflow_link_bytes_total", link="edge-cloud", direction="up")
    assert total(e, "aiflow_link_bytes_total", link="device-edge", direction="up") > 0
    down = total(e, "aiflow_link_bytes_total", link="edge-cloud", direction="down")
    assert down == 8 * 4  # the 4 tokens come back; the edge passes them on
    assert down == total(k, "aiflow_link_bytes_total", link="edge-cloud", direction="down")
    assert down == total(e, "aiflow_link_bytes_total", link="device-edge", direction="down")
    # int8 on the edge's cut: up to 4x smaller than float32 (integer tensors go raw)
    ratio = total(e, "aiflow_compression_ratio_sum") / total(e, "aiflow_compression_ratio_count")
    assert 1 < ratio <= 4, ratio
    # the QUIC path to the next tier (only the edge has one)
    rtt = total(e, "aiflow_quic_rtt_seconds", link="edge-cloud")
    assert 0 < rtt < 1, rtt
    assert total(e, "aiflow_quic_congestion_window_bytes") > 0
    assert total(e, "aiflow_quic_sent_packets_total") > 0
    assert ("aiflow_quic_lost_packets_total", (("link", "edge-cloud"), ("tier", "edge"))) in e
    assert not any(n.startswith("aiflow_quic_") and not n.startswith("aiflow_quic_peer_") for n, _ in k)
    # the connections a tier serves: the cloud's one from the edge is still open
    assert total(k, "aiflow_quic_peer_connections") == 1
    assert 0 < total(k, "aiflow_quic_peer_rtt_seconds", stat="max") < 1
    assert total(k, "aiflow_quic_peer_sent_packets") > 0
    assert ("aiflow_quic_peer_connections", (("tier", "edge"),)) in e
