"""Peak activation memory of one stage run: bytes allocated beyond what existed before, at the worst moment.

On CUDA this is the allocator's own peak. On CPU torch keeps no such statistic, so a dispatch mode watches every
op: each new storage counts while a tensor refers to it (views share their storage), and is released when the
last such tensor is freed. Weights and inputs that existed before do not count.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0:
                continue
            if key not in self.refs:
                if any(a is t for a in tree_flatten((args, kwargs))[0]):
                    continue  # in-place op returning its input: nothing new
                self.refs[key] = 0
                self.sizes[key] = t.untyped_storage().nbytes()
                self.current += self.sizes[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_activation_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Runs ``fn()`` once and returns the peak of the memory it allocated (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    tracker = _Tracker()
    with tracker:
        result = fn()
    del result
    return tracker.peak
