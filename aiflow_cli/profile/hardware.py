"""What machine a profile was measured on (CPU model, cores, GPU, torch version)."""

from __future__ import annotations

import os
import platform

import torch

from aiflow_cli.profile.schema import Hardware


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def detect(device: torch.device, label: str = "") -> Hardware:
    """The hardware record for a profile measured on ``device``."""
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return Hardware(
        device=device.type,  # type: ignore[arg-type]  # pydantic refuses a device other than cpu/cuda
        cpu=cpu_model(),
        cores=usable_cores(),
        torch_threads=torch.get_num_threads(),
        gpu=gpu,
        torch_version=torch.__version__,
        label=label,
    )
