"""Which CPU this is, as far as the speed of a kernel depends on it: the model and flags, torch and
its thread count, and the caps that make the same CPU run other kernels. kernels.py keys its
timings by it, paged_ops.py names its compiled library after it. Also the caps a serving process
sets on the CPU libraries' memory (SERVING_ENV)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# caps that make the same CPU run other kernels (oneDNN's GEMMs, torch's own vector code, the
# target Amber's compiled ops are built for: paged_ops.MARCH)
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "AMBER_KERNEL_MARCH")

# what a serving process sets before it starts (a value in the environment wins):
# - oneDNN keeps up to 1,024 GEMM primitives by default, one per shape it met (every batch size and
#   prefill width), each with its own buffers: 16 of them measured 70 MB lower RSS at 16 concurrent
#   requests and 180 MB lower at 64, at the same tokens/s (read at oneDNN's first GEMM);
# - at most two glibc malloc arenas: by default each HTTP thread gets its own, and their retained
#   pages measured ~95 MB of RSS under 16 concurrent requests (read when the process starts)
SERVING_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "MALLOC_ARENA_MAX": "2"}


def serving_env() -> dict[str, str]:
    """SERVING_ENV with the values this process's environment already gives: for a process started
    from here (a Ray replica)."""
    return {name: os.environ.get(name, value) for name, value in SERVING_ENV.items()}


def machine() -> dict:
    """What the timings depend on: the CPU (model and flags), torch, and its thread count."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:  # not Linux: what the platform module knows
        pass
    model = model or platform.processor() or platform.machine()
    limits = {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}
    return {"cpu": model, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "isa_limits": limits}
