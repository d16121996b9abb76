"""A tier as a pool of replicas on Ray (docs/scale.md): each replica is a Ray actor that builds the tier's
:class:`TierServer` (its stages, its QUIC listener with the tier's own certificate) in its own process.

Activations never touch Ray: devices and the upstream tier reach the replicas over mutual-TLS QUIC, and pick one
per session with :class:`aiflow_cli.runtime.routing.PoolClient`. Ray carries only control: the replicas'
addresses, liveness and load (active sessions), and starting and stopping them. The certificate is read from
``identity_dir`` on the node the replica runs on; it never travels over Ray.

    with RayPool(TierSpec("cloud", "plan.json", "keys/cloud", trust), replicas=2) as pool:
        edge_next = pool.client(identity="keys/edge", trust=trust)   # a PoolClient fed by pool.addresses
        ...
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from aiflow_cli.errors import AiflowError, InputError, TransportError
from aiflow_cli.runtime.autoscale import Autoscaler, Decision, ScalePolicy
from aiflow_cli.runtime.routing import PoolClient
from aiflow_cli.runtime.serve import TierSpec
from aiflow_cli.transport import Identity, Limits

#: CPU reserved per replica on Ray (fractional: several small replicas share a core in tests).
DEFAULT_REPLICA_CPUS = 1.0
#: Seconds a replica may take to load its stages and listen.
START_TIMEOUT_S = 120.0
#: Seconds a control call (load, address) may take before the replica counts as dead.
CONTROL_TIMEOUT_S = 5.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("a tier pool runs on Ray: pip install 'aiflow[ray]'", param="ray") from None
    return ray


class TierReplica:
    """The body of one replica actor (wrapped by ``ray.remote`` in :meth:`RayPool._actor_class`): the
    :class:`TierServer` of a :class:`TierSpec` (its ``listen`` port is best 0; a host of ``0.0.0.0`` on a
    cluster, where the replica then advertises its node's IP address)."""

    def __init__(self, spec: dict[str, Any]):
        s = TierSpec.from_json(spec)
        self.server = s.build()
        host, port = self.server.address.rsplit(":", 1)
        if s.listen.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "::"):  # on a cluster: advertise the node's IP
            import ray

            host = ray.util.get_node_ip_address()
        self.address = f"{host}:{port}"

    def info(self) -> dict[str, Any]:
        return {**self.server.ready_info(), "address": self.address, "pid": os.getpid()}

    def load(self) -> dict[str, Any]:
        """The tier's own load signal: sessions with a live KV cache, and their bytes."""
        sessions = self.server.node.sessions
        return {"address": self.address, "active_sessions": len(sessions), "cache_bytes": sessions.total_bytes}

    def stop(self) -> dict[str, Any]:
        stats = self.server.server.stats()
        self.server.close()
        return stats


@dataclass
class Replica:
    name: str
    actor: Any
    address: str
    pid: int
    fingerprint: str


class RayPool:
    """``replicas`` replicas of ``spec``'s tier on the Ray cluster this process is connected to (``ray.init``
    first, or pass ``address``: ``"local"`` starts a private one with ``num_cpus``, ``"auto"`` or
    ``HOST:PORT`` joins a running one). ``policy``: autoscaling (:meth:`autoscale`); None: a fixed size, dead
    replicas replaced by :meth:`heal`."""

    def __init__(
        self,
        spec: TierSpec,
        replicas: int = 1,
        *,
        replica_cpus: float = DEFAULT_REPLICA_CPUS,
        address: Optional[str] = None,
        num_cpus: Optional[int] = None,
        policy: Optional[ScalePolicy] = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        if replicas < 1:
            raise InputError(f"replicas={replicas}: must be >= 1", param="replicas")
        if not replica_cpus > 0:
            raise InputError(f"replica_cpus={replica_cpus}: must be > 0", param="replica_cpus")
        ray = _ray()
        self.spec = spec
        self.replica_cpus = replica_cpus
        self.start_timeout_s = start_timeout_s
        self.policy = policy or ScalePolicy(replicas, replicas)
        self.autoscaler = Autoscaler(self.policy)
        self.replicas: dict[str, Replica] = {}
        self._serial = 0
        self._lock = threading.Lock()
        self._owns_ray = False
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address in (None, "local"):
                kw["num_cpus"] = num_cpus
            else:
                kw["address"] = address
            ray.init(**kw)
            self._owns_ray = True
        try:
            self.scale_to(max(replicas, self.policy.min_replicas))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _actor_class(cpus: float) -> Any:
        ray = _ray()
        # max_restarts=0: a dead replica stays dead (its sessions move to the others; the pool starts a new one)
        return ray.remote(num_cpus=cpus, max_restarts=0)(TierReplica)

    def _start(self, n: int) -> None:
        ray = _ray()
        cls = self._actor_class(self.replica_cpus)
        started = []
        for _ in range(n):
            with self._lock:
                self._serial += 1
                name = f"{self.spec.role}-{self._serial}"
            started.append((name, cls.remote(asdict(self.spec))))
        try:
            infos = ray.get([a.info.remote() for _, a in started], timeout=self.start_timeout_s)
        except Exception as e:
            for _, a in started:
                ray.kill(a)
            raise _start_error(self.spec.role, e) from None
        with self._lock:
            for (name, actor), info in zip(started, infos):
                self.replicas[name] = Replica(name, actor, info["address"], info["pid"], info["fingerprint"])

    def scale_to(self, n: int, remove: Sequence[str] = ()) -> None:
        """Starts replicas up to ``n``, or stops ``remove`` (named replicas) to come down to it."""
        have = len(self.replicas)
        if n > have:
            self._start(n - have)
        for name in remove:
            self.stop_replica(name)

    def stop_replica(self, name: str) -> None:
        ray = _ray()
        with self._lock:
            r = self.replicas.pop(name, None)
        if r is None:
            return
        try:
            ray.get(r.actor.stop.remote(), timeout=CONTROL_TIMEOUT_S)
        except Exception:
            pass  # dead already, or stuck: killed below either way
        ray.kill(r.actor)

    def kill(self, name: str) -> Replica:
        """Kills a replica's process at once, as a crash would (``ray.kill``); returns it."""
        with self._lock:
            r = self.replicas[name]
        _ray().kill(r.actor, no_restart=True)
        return r

    def loads(self) -> dict[str, dict[str, Any]]:
        """Each live replica's ``load()``; a replica that does not answer within the control timeout is dropped
        from the pool (Ray reports a dead actor at once)."""
        ray = _ray()
        with self._lock:
            current = list(self.replicas.values())
        refs = {r.name: r.actor.load.remote() for r in current}
        out: dict[str, dict[str, Any]] = {}
        for r in current:
            try:
                out[r.name] = ray.get(refs[r.name], timeout=CONTROL_TIMEOUT_S)
            except Exception:
                with self._lock:
                    self.replicas.pop(r.name, None)
                try:
                    ray.kill(r.actor)
                except Exception:
                    pass
        return out

    def addresses(self) -> list[str]:
        """QUIC addresses of the live replicas (a :class:`PoolClient`'s ``replicas`` provider)."""
        return [v["address"] for v in self.loads().values()]

    def heal(self) -> int:
        """Replaces dead replicas up to the policy's minimum; returns how many it started."""
        self.loads()
        missing = self.policy.min_replicas - len(self.replicas)
        if missing > 0:
            self._start(missing)
        return max(0, missing)

    def autoscale(self) -> Decision:
        """One autoscaling poll: the replicas' active sessions -> :class:`Decision`, applied."""
        loads = self.loads()
        d = self.autoscaler.decide({name: v["active_sessions"] for name, v in loads.items()})
        self.scale_to(d.target, d.remove)
        return d

    def client(
        self,
        *,
        identity: Identity,
        trust: Sequence[str | Identity],
        limits: Optional[Limits] = None,
        timeout_s: float = 30.0,
        **kw: Any,
    ) -> PoolClient:
        """A :class:`PoolClient` of this pool for the upstream tier (or the device), refreshed from Ray."""
        return PoolClient(self.addresses, identity=identity, trust=trust, limits=limits, timeout_s=timeout_s, **kw)

    def close(self) -> None:
        """Stops every replica (all at once); shuts down the Ray instance this pool started (not one it joined)."""
        ray = _ray()
        with self._lock:
            gone, self.replicas = list(self.replicas.values()), {}
        stops = []
        for r in gone:
            try:
                stops.append(r.actor.stop.remote())
            except Exception:
                pass
        try:
            ray.wait(stops, num_returns=len(stops), timeout=CONTROL_TIMEOUT_S)
        except Exception:
            pass  # dead replicas: killed below either way
        for r in gone:
            ray.kill(r.actor)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_error(role: str, e: BaseException) -> AiflowError:
    """A replica's start failure in one line: the tier's own error if it raised one."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, AiflowError):
        return type(cause)(f"a {role} replica did not start: {cause}")
    text = str(cause).strip().splitlines()
    return TransportError(f"a {role} replica did not start: {text[-1] if text else type(cause).__name__}")


def serve_pool(
    spec: TierSpec,
    replicas: int,
    *,
    address: Optional[str],
    policy: Optional[ScalePolicy],
    replica_cpus: float,
    poll_s: float = 2.0,
    duration_s: Optional[float] = None,
    on_event: Any = None,
) -> None:
    """What `aiflow serve --replicas N` runs: the pool, an autoscaling (or healing) poll every ``poll_s`` until
    SIGTERM/SIGINT (or ``duration_s``), then every replica stopped. ``on_event(dict)``: ready / scaled / stopped."""
    import signal

    from aiflow_cli import signals

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        signals.record(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in signals.SIGNALS}
    emit = on_event or (lambda e: None)
    pool = None
    try:
        pool = RayPool(spec, replicas, address=address, policy=policy, replica_cpus=replica_cpus)
        for s in signals.SIGNALS:  # ray.init installs its own SIGTERM handler: ours again
            signal.signal(s, on_signal)
        reps = list(pool.replicas.values())
        emit(
            {
                "event": "ready",
                "role": spec.role,
                "replicas": [{"name": r.name, "address": r.address, "pid": r.pid} for r in reps],
                "next": ",".join(r.address for r in reps),
                "fingerprint": reps[0].fingerprint,
            }
        )
        t_end = None if duration_s is None else time.monotonic() + duration_s
        while not stop.wait(poll_s if t_end is None else max(0.0, min(poll_s, t_end - time.monotonic()))):
            if t_end is not None and time.monotonic() >= t_end:
                break
            before = set(pool.replicas)
            d = pool.autoscale() if policy is not None else None
            if policy is None:
                pool.heal()
            if set(pool.replicas) != before:
                emit(
                    {
                        "event": "scaled",
                        "replicas": [{"name": r.name, "address": r.address} for r in pool.replicas.values()],
                        "next": ",".join(r.address for r in pool.replicas.values()),
                        "reason": d.reason if d else "replaced a dead replica",
                    }
                )
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if pool is not None:
            pool.close()
        emit({"event": "stopped", "role": spec.role})
