"""A server tier: a :class:`TierNode` behind a transport server, in this process (:class:`TierServer`, what
`aiflow serve --role edge|cloud` runs) or in a child process (:class:`TierProcess`, what
:class:`aiflow_cli.runtime.cluster.LocalCluster` starts).

A server loads only its own stages, listens, and serves until SIGTERM/SIGINT or ``duration_s``. A child process
is described by a :class:`TierSpec`; it dies with its parent (:func:`aiflow_cli.signals.die_with_parent`) and
reports a :class:`TierReady` (or a :class:`TierFailed`) over a pipe once it listens.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, cast

from aiflow_cli import errors, signals
from aiflow_cli.errors import AiflowError, InputError, TransportError
from aiflow_cli.models import StagedModel, load_stages
from aiflow_cli.plan.schema import load_plan
from aiflow_cli.runtime.batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS, BatchSettings
from aiflow_cli.runtime.node import TierNode
from aiflow_cli.runtime.replan import PlanRouter
from aiflow_cli.runtime.roles import check_role, check_trust
from aiflow_cli.runtime.routing import PoolClient, connect
from aiflow_cli.transport import Client, Identity, Limits, Server, as_identity


class TierServer:
    """Tier ``role`` of the plan at ``plan_path``, listening on ``listen``; ``next_addr`` is the next tier."""

    def __init__(
        self,
        role: str,
        plan_path: str | Path,
        *,
        listen: str,
        identity: Identity | str | Path,
        trust: Sequence[str],
        next_addr: Optional[str] = None,
        speed: float = 1.0,
        cache_limit_bytes: int = 1 << 30,
        timeout_s: float = 120.0,
        insecure_dev: bool = False,
        limits: Optional[Limits] = None,
        dilation: float = 1.0,
        metrics: Optional[str] = None,
        next_client: Optional[PoolClient] = None,
        batching: Optional[BatchSettings] = None,
        model: Optional[StagedModel] = None,
    ):
        """``metrics``: HOST:PORT to serve Prometheus metrics on (aiflow_cli/runtime/metrics.py); None: none.
        ``next_addr`` with commas names a pool of replicas of the next tier; ``next_client`` gives one built
        elsewhere (e.g. :meth:`RayPool.client`, refreshed from Ray). ``batching``: decode batching across
        sessions (aiflow_cli/runtime/batching.py; None: its defaults). ``model``: this tier's stages, loaded
        already (:meth:`TierSpec.load_stages`; None: loaded here)."""
        check_role(role)
        check_trust(trust, insecure_dev)
        if metrics is not None:
            from aiflow_cli.runtime.metrics import parse_listen

            parse_listen(metrics)  # a bad address is refused before the stages load
        plan = load_plan(plan_path)
        ident = as_identity(identity)
        nxt = cast(Optional[Client], next_client)  # a PoolClient has the Client methods a TierNode uses
        if nxt is None and next_addr:  # with commas: a pool of replicas of the next tier (docs/scale.md)
            nxt = connect(
                next_addr,
                identity=ident,
                trust=list(trust),
                limits=limits,
                timeout_s=timeout_s,
                insecure_dev=insecure_dev,
            )
        self.node = TierNode(
            plan,
            role,
            next_client=nxt,
            speed=speed,
            cache_limit_bytes=cache_limit_bytes,
            dilation=dilation,
            batching=batching,
            model=model,
        )
        # routes requests by plan hash; switches plans when the device proposes one (runtime/replan.py)
        self.router = PlanRouter(self.node, nxt)
        self.server = Server(
            listen,
            identity=ident,
            trust=list(trust),
            handler=self.router.handle,
            limits=limits,
            insecure_dev=insecure_dev,
        )
        self.identity = ident
        self.metrics, self.metrics_address = None, ""
        if metrics is not None:
            from aiflow_cli.runtime.metrics import TierMetrics

            self.metrics = TierMetrics(self.node, self.server)
            try:
                self.metrics_address = self.metrics.serve(metrics)
            except BaseException:
                self.close()
                raise
            self.node.observer = self.metrics

    @property
    def address(self) -> str:
        return self.server.address

    def ready_info(self) -> dict[str, Any]:
        return {
            "event": "ready",
            "role": self.node.tier,
            "address": self.address,
            "fingerprint": self.identity.fingerprint,
            **({"metrics": self.metrics_address} if self.metrics else {}),
            **self.node.describe(),
        }

    def serve_forever(self, duration_s: Optional[float] = None, on_ready: Callable[[dict], None] | None = None) -> dict:
        """Blocks until SIGTERM/SIGINT (or ``duration_s``), then closes and returns the transport's counters."""
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            signals.record(signum)  # the CLI exits 128 + signum once the server is closed
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in signals.SIGNALS}
        try:
            if on_ready:
                on_ready(self.ready_info())
            stop.wait(duration_s)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            stats = self.server.stats()
            self.close()
        return stats

    def close(self) -> None:
        self.server.close()
        if self.node.next is not None:
            self.node.next.close()
        if self.metrics is not None:
            self.metrics.close()


# ---- a tier in a child process -------------------------------------------------------------------------------

#: Seconds a child tier may take to load its stages and listen.
START_TIMEOUT_S = 120.0
#: Seconds :meth:`TierProcess.stop` waits after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 5.0
#: What a tier child runs: it asks to die with its parent before importing anything heavy, and imports aiflow from
#: where its parent did (``sys.argv[3]``; ``python -c`` would look in its working directory first, which may hold
#: another checkout).
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[3]); "
    "from aiflow_cli.signals import die_with_parent; die_with_parent(int(sys.argv[2])); "
    "from aiflow_cli.runtime.serve import tier_main; tier_main(int(sys.argv[1]))"
)
#: The folder that holds the ``aiflow_cli`` package this process runs.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class TierSpec:
    """Everything a tier child needs to build its :class:`TierServer` (sent to it as JSON)."""

    role: str
    plan_path: str
    identity_dir: str
    trust: tuple[str, ...]
    listen: str = "127.0.0.1:0"
    next_addr: Optional[str] = None
    speed: float = 1.0
    cache_limit_bytes: int = 1 << 30
    threads: Optional[int] = None
    """torch intra-op threads (None: torch's default)."""
    dilation: float = 1.0
    """time dilation factor of the run (aiflow_cli/runtime/dilation.py); every tier of a run uses the same."""
    metrics: Optional[str] = None
    """HOST:PORT of the tier's Prometheus metrics (None: none)."""
    batch_max: int = DEFAULT_MAX_BATCH
    """most sessions per batched decode pass (1: no batching; aiflow_cli/runtime/batching.py)."""
    batch_window_ms: float = DEFAULT_WINDOW_MS
    next_later: bool = False
    """``next_addr`` comes later, as a line of its own (:meth:`TierProcess.send_next`): the child loads its
    stages meanwhile, while the next tier starts."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TierSpec":
        return cls(**{**d, "trust": tuple(d["trust"])})

    def _threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def load_stages(self) -> StagedModel:
        """The stages of this tier of the plan, loaded in this process (torch's threads set first)."""
        self._threads()
        plan = load_plan(self.plan_path)
        return load_stages(plan.model, list(plan.stages_for(self.role)))

    def build(self, model: Optional[StagedModel] = None) -> TierServer:
        """The :class:`TierServer` this spec describes, in this process (torch's threads set first); ``model``:
        its stages loaded already (:meth:`load_stages`)."""
        self._threads()
        return TierServer(
            self.role,
            self.plan_path,
            listen=self.listen,
            identity=self.identity_dir,
            trust=self.trust,
            next_addr=self.next_addr,
            speed=self.speed,
            dilation=self.dilation,
            cache_limit_bytes=self.cache_limit_bytes,
            metrics=self.metrics,
            batching=BatchSettings(self.batch_max, self.batch_window_ms),
            model=model,
        )


@dataclass(frozen=True)
class TierReady:
    """A tier child listens: its bound ``address``, certificate ``fingerprint`` and what ``hello`` reports."""

    role: str
    address: str
    fingerprint: str
    pid: int
    node: dict[str, Any] = field(default_factory=dict)
    metrics: str = ""
    """``host:port`` of its Prometheus metrics ("" for none)."""


@dataclass(frozen=True)
class TierFailed:
    """A tier child could not start: ``kind`` names the :class:`AiflowError` class to raise in the parent."""

    role: str
    kind: str
    message: str
    param: Optional[str] = None
    """The library parameter(s) the child's error names (:attr:`AiflowError.param`): the CLI names its flags."""

    def error(self) -> AiflowError:
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, AiflowError)):
            cls = AiflowError
        return cls(f"the {self.role} tier did not start: {self.message}", param=self.param)


def _send(fd: int, event: TierReady | TierFailed) -> None:
    line = json.dumps({"type": type(event).__name__, **asdict(event)}) + "\n"
    os.write(fd, line.encode())


def _receive(line: bytes) -> TierReady | TierFailed:
    d = json.loads(line)
    kind = d.pop("type")
    return TierReady(**d) if kind == "TierReady" else TierFailed(**d)


def tier_main(ready_fd: int) -> None:
    """The body of a tier child: reads a :class:`TierSpec` (a JSON line) on stdin, and with ``next_later`` loads
    its stages before it reads the next tier's address (the next line); reports on ``ready_fd``, serves until
    SIGTERM/SIGINT, then exits at once (128 + the signal) without the interpreter's slow teardown."""
    spec = TierSpec.from_json(json.loads(sys.stdin.readline()))
    try:
        model, load_ms = None, 0.0
        if spec.next_later:
            t0 = time.perf_counter()
            model = spec.load_stages()
            load_ms = (time.perf_counter() - t0) * 1e3
            line = sys.stdin.readline().strip()
            if not line:  # the parent gave up before the next tier started
                os._exit(1)
            spec = replace(spec, next_addr=line, next_later=False)
        srv = spec.build(model)
        if model is not None:
            srv.node.load_ms = load_ms  # what hello reports: the stages' load, done before the node was made
    except AiflowError as e:
        _send(ready_fd, TierFailed(spec.role, type(e).__name__, str(e), e.param))
        os._exit(e.exit_code)

    def ready(info: dict[str, Any]) -> None:
        pid, described = os.getpid(), srv.node.describe()
        _send(
            ready_fd, TierReady(spec.role, srv.address, srv.identity.fingerprint, pid, described, srv.metrics_address)
        )
        os.close(ready_fd)
        print(f"{spec.role} ready on {srv.address} (pid {os.getpid()})", file=sys.stderr, flush=True)

    stats = srv.serve_forever(on_ready=ready)
    print(f"{spec.role} stopped: {stats}", file=sys.stderr, flush=True)
    os._exit(signals.exit_code(0))


class TierProcess:
    """A tier served by a child process (see :class:`TierSpec`); :attr:`ready` once it listens. Raises the
    child's own error class if it fails to start, or :class:`TransportError` naming the tier, with its log's last
    line, if it dies.

    In steps, so that tiers start at once: making the object starts the child, which imports torch and the
    runtime while the caller goes on; :meth:`send` gives it its :class:`TierSpec`; with ``next_later`` the child
    loads its stages, then waits for :meth:`send_next` to give the next tier's address, known once that tier
    listens; :meth:`wait_ready` waits until it listens (:meth:`start`: send and wait). Given a spec instead of a
    role, the object does it all."""

    def __init__(
        self,
        spec: TierSpec | str,
        log_path: Path,
        *,
        env: Optional[dict[str, str]] = None,
        timeout_s: float = START_TIMEOUT_S,
    ):
        self.role = spec.role if isinstance(spec, TierSpec) else spec
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.spec: Optional[TierSpec] = None
        r, w = os.pipe()
        self._ready_fd: Optional[int] = r
        try:
            self.proc = signals.spawn(
                [sys.executable, "-c", _CHILD_CODE, str(w), str(os.getpid()), _PACKAGE_ROOT],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=self._log,
                env=env,
                pass_fds=(w,),
                start_new_session=True,
            )
        except BaseException:
            os.close(r)
            self._log.close()
            raise
        finally:
            os.close(w)
        if isinstance(spec, TierSpec):
            self.start(spec, timeout_s)

    def start(self, spec: TierSpec, timeout_s: float = START_TIMEOUT_S) -> TierReady:
        """:meth:`send` ``spec`` then :meth:`wait_ready`."""
        self.send(spec)
        return self.wait_ready(timeout_s)

    def send(self, spec: TierSpec) -> None:
        """Sends ``spec`` (of this object's role) to the child; with ``spec.next_later``, :meth:`send_next` gives
        its ``next_addr`` later."""
        if self.spec is not None:
            raise InputError(f"the {self.role} tier process has its spec already", param="spec")
        if spec.role != self.role:
            raise InputError(f"spec.role={spec.role!r}: this process serves the {self.role} tier", param="spec")
        self.spec = spec
        self._write(json.dumps(asdict(spec)) + "\n", last=not spec.next_later)

    def send_next(self, next_addr: str) -> None:
        """The ``next_addr`` of a spec sent with ``next_later``."""
        if self.spec is None or not self.spec.next_later:
            raise InputError(f"the {self.role} tier process was not sent a spec with next_later", param="spec")
        self._write(next_addr + "\n", last=True)

    def _write(self, text: str, *, last: bool) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
            if last:
                self.proc.stdin.close()
        except BrokenPipeError:  # the child died first: wait_ready reads why (its failure, or its log)
            pass

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> TierReady:
        """Waits until the child listens (its spec sent); on failure the child is stopped and its error raised."""
        if self._ready_fd is None:
            raise InputError(f"the {self.role} tier process was waited for already", param="timeout_s")
        fd, self._ready_fd = self._ready_fd, None
        try:
            self.ready = self._wait_ready(fd, timeout_s)
            return self.ready
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(fd)

    def _wait_ready(self, fd: int, timeout_s: float) -> TierReady:
        deadline = time.monotonic() + timeout_s
        buf = b""
        while b"\n" not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
        if b"\n" in buf:
            event = _receive(buf.split(b"\n", 1)[0])
            if isinstance(event, TierFailed):
                raise event.error()
            return event
        self.stop()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else "(its log is empty)"
        why = f"exit {self.proc.returncode}" if self.proc.returncode is not None else f"not ready in {timeout_s:g} s"
        raise TransportError(f"the {self.role} tier did not start ({why}): {last} (log: {self.log_path})")

    @property
    def address(self) -> str:
        return self.ready.address

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Sends SIGTERM (the child closes its server and exits); :meth:`stop` waits for it."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; reaps the child and closes its log (and the pipes of a child
        that was never started)."""
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        signals.forget(self.proc)
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:  # what was left to flush has no reader any more
                pass
        self._log.close()
