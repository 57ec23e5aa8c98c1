"""Which CPU this is, as far as the speed of a kernel depends on it: the model and flags, torch and
its thread count, and the caps that make the same CPU run other kernels. kernels.py keys its
timings by it, paged_ops.py names its compiled library after it."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# caps that make the same CPU run other kernels (oneDNN's GEMMs, torch's own vector code)
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


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
