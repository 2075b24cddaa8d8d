"""Timing, peak memory, FLOP counting and a description of the machine.

Peak memory of one run = the bytes the implementation keeps resident (its parameters and buffers,
optimizer state, gradients) + the largest growth of memory during the run:

* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the run;
* CPU: the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
  its resident size before the run, after ``gc`` and ``malloc_trim`` returned freed memory to the
  system. It counts every allocation (PyTorch's, Python's, the memory-mapped feature cache pages), not
  only tensors. Where the peak cannot be reset, a sampling thread reads ``VmRSS`` every millisecond.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ibkit.models.precision import synchronize


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages (tied weights counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def resident_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters, buffers, gradients and optimizer state that an implementation keeps between runs."""
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc), so the next run's growth shows in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.delta`` = peak growth of memory during the block, in bytes (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.delta = 0
        self.method = ""
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._max_rss = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - allocated before"
            return self
        _malloc_trim()
        self._before = _status_kib("VmRSS") * 1024
        if _can_reset_hwm():
            self.method = "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before, after gc + malloc_trim"
        else:
            self.method = "peak of VmRSS sampled every 1 ms - RSS before, after gc + malloc_trim"
            self._max_rss = self._before
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, _status_kib("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.delta = torch.cuda.max_memory_allocated(self.device) - self._before
            return
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._max_rss
        else:
            peak = _status_kib("VmHWM") * 1024
        self.delta = max(0, peak - self._before)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of matmuls, convolutions and attention in ``fn`` (forward and backward).

    PyTorch's own per-op formulas (``torch.utils.flop_counter``), summed by a plain dispatch mode:
    ``FlopCounterMode``'s per-module tracking trips over parameters used under ``no_grad`` (generation).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Counter():
        fn()
    return Counter.total


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    have = [f for f in wanted if flags and f in flags.group(1).split()]
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE)
    model = re.search(r"^model\s*:\s*(\d+)$", text, re.MULTILINE)
    ident = f" (family {family.group(1)}, model {model.group(1)})" if family and model else ""
    return f"{name.group(1).strip() if name else platform.machine()}{ident}; {' '.join(have)}"


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU/GPU, memory, thread count and the load average (other processes disturb CPU timings)."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, ValueError, AttributeError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def versions() -> dict[str, str]:
    import transformers

    import ibkit

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ibkit": ibkit.__version__,
    }
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
