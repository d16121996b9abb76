"""``aiflow serve --replicas N [--ray ADDRESS] [--max-replicas M]``: a tier as a pool of replicas on Ray
(aiflow_cli/runtime/ray_pool.py, docs/scale.md). The upstream tier (or device) is given the replicas' addresses
as ``--next A,B,...``; activations go to them over QUIC, never over Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from aiflow_cli.console import err_console
from aiflow_cli.errors import InputError


def serve_pool_cli(
    role: str,
    plan: Path,
    listen: str,
    next_addr: Optional[str],
    identity: Path,
    trust: list[str],
    speed: float,
    dilation: float,
    cache_mib: int,
    duration_s: Optional[float],
    insecure_dev: bool,
    json_out: bool,
    metrics: Optional[str],
    *,
    replicas: int,
    ray_address: Optional[str],
    max_replicas: Optional[int],
    target_sessions: int,
    cpus: float,
    batch_max: int = 128,
    batch_window_ms: float = 0.0,
) -> None:
    from aiflow_cli.runtime.autoscale import ScalePolicy

    if role not in ("edge", "cloud"):  # checked before the heavy imports (torch, Ray) below
        raise InputError(f"--role {role!r}: choose edge or cloud (the device side is `aiflow run`)", param="role")
    if insecure_dev:
        raise InputError(
            "--insecure-dev is for one local process; a pool's replicas need --trust", param="insecure_dev"
        )
    if not trust:
        raise InputError("give --trust FINGERPRINT for every peer (devices, the tier in front, the next tier)")
    if not (Path(identity) / "node.crt").is_file():
        raise InputError(f"--identity {identity}: no node.crt there (aiflow keygen); every Ray node needs it there")
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    policy = None
    if max_replicas is not None:
        if max_replicas < replicas:
            raise InputError(f"--max-replicas {max_replicas}: must be >= --replicas ({replicas})", param="max_replicas")
        policy = ScalePolicy(min_replicas=replicas, max_replicas=max_replicas, target_sessions=target_sessions)
    from aiflow_cli.runtime.ray_pool import serve_pool
    from aiflow_cli.runtime.serve import TierSpec

    spec = TierSpec(
        role=role,
        plan_path=str(Path(plan).resolve()),
        identity_dir=str(Path(identity).resolve()),
        trust=tuple(trust),
        listen=f"{host}:0",  # each replica on a free port of HOST
        next_addr=next_addr,
        speed=speed,
        cache_limit_bytes=cache_mib << 20,
        threads=1,
        dilation=dilation,
        metrics=f"{metrics.rsplit(':', 1)[0]}:0" if metrics else None,
        batch_max=batch_max,
        batch_window_ms=batch_window_ms,
    )

    def on_event(e: dict[str, Any]) -> None:
        if json_out:
            sys.stdout.write(json.dumps(e) + "\n")
            sys.stdout.flush()
        elif e["event"] == "ready":
            for r in e["replicas"]:
                err_console.print(
                    f"{role} replica {r['name']} ready on {r['address']} (pid {r['pid']})", highlight=False
                )
            err_console.print(
                f"{role} pool of {len(e['replicas'])} ready (fingerprint {e['fingerprint'][:16]}..): give the tier in "
                f"front --next {e['next']}" + ("" if duration_s else "; Ctrl-C to stop"),
                highlight=False,
            )
        elif e["event"] == "scaled":
            err_console.print(
                f"{role} pool now {len(e['replicas'])} ({e['reason']}): --next {e['next']}", highlight=False
            )
        else:
            err_console.print(f"{role} pool stopped", highlight=False)

    serve_pool(
        spec,
        replicas,
        address=ray_address or "local",
        policy=policy,
        replica_cpus=cpus,
        duration_s=duration_s,
        on_event=on_event,
    )
