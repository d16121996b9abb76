"""Library parameter names -> the CLI flags that set them: the one place where errors learn flag names.

Library errors name the parameter they are about (``speed=1.5: ...``, ``speeds[edge]=0: ...``, `` `trust` ``) and
say so in ``param``; :func:`for_cli` rewrites those mentions to the flag a CLI user typed (``--speed 1.5``,
``--speed edge=0``, ``--trust``). Errors without ``param`` print unchanged.
"""

from __future__ import annotations

import re

from aiflow_cli.errors import AiflowError

#: parameter -> flag. Mapping parameters (``speeds``, ``links``) take ``TIER=VALUE`` / ``A-B=NAME`` flags.
FLAGS: dict[str, str] = {
    # models
    "batch": "--batch",
    "seq_len": "--seq-len",
    "image_size": "--image-size",
    "device": "--device",
    "dtype": "--dtype",
    # profile
    "repeats": "--repeats",
    "warmup": "--warmup",
    "decode_tokens": "--decode-tokens",
    "fidelity_cuts": "--fidelity-cuts",
    "calibration_items": "--calibration-items",
    "calibration_tokens": "--calibration-tokens",
    # plan
    "profiles": "--profile",
    "speeds": "--speed",
    "links": "--link",
    "memory_bytes": "--memory",
    "min_fidelity": "--min-fidelity",
    "codecs": "--codecs",
    "skip": "--skip-tier",
    "require": "--require-tier",
    "tokens": "--tokens",
    "input_bytes": "--input-bytes",
    "sweep": "--sweep",
    "link": "--sweep",
    # runtime
    "speed": "--speed",
    "next_client": "--next",
    "next_addr": "--next",
    "edge": "--edge",
    "role": "--role",
    "trust": "--trust",
    "insecure_dev": "--insecure-dev",
    "timeout_s": "--timeout",
    "fallback": "--fallback",
    "max_new_tokens": "--max-new-tokens",
    "cache_limit_bytes": "--cache-mib",
    "dilation": "--dilation",
    "metrics": "--metrics",
    "batch_max": "--batch-max",
    "batch_window_ms": "--batch-window-ms",
    "speculate": "--speculate",
    "draft": "--draft",
    "exit_layer": "--exit-layer",
    "steps": "--steps",
    "replicas": "--replicas",  # a tier pool (docs/scale.md)
    "min_replicas": "--replicas",
    "max_replicas": "--max-replicas",
    "target_sessions": "--target-sessions",
    "replica_cpus": "--replica-cpus",
    "replan": "--replan",
    # bench e2e
    "link_names": "--links",
    "device_speed": "--device-speed",
    "edge_speed": "--edge-speed",
    "cloud_speed": "--cloud-speed",
    "headroom": "--headroom",
    "threads": "--threads",
    "budget_s": "--budget-s",
    "image": "--image",
    # bench decode
    "rtts_ms": "--rtt",
    "split": "--split",
    "k": "--k",
    "replan_requests": "--replan-requests",
}


def for_cli(exc: BaseException) -> str:
    """``str(exc)`` with the parameters it names (``exc.param``) written as the CLI's flags."""
    text = str(exc)
    param = getattr(exc, "param", None) if isinstance(exc, AiflowError) else None
    for name in (param or "").split(","):
        flag = FLAGS.get(name.strip())
        if not flag:
            continue
        n = re.escape(name.strip())
        text = re.sub(rf"(?<![\w.-]){n}\[([^\]]+)\]=", rf"{flag} \1=", text)  # speeds[edge]=0 -> --speed edge=0
        text = re.sub(rf"(?<![\w.-]){n}=", f"{flag} ", text)  # speed=1.5 -> --speed 1.5
        text = text.replace(f"`{name.strip()}`", flag)  # `trust` -> --trust
    return text
