"""What machine a bench ran on, printed first by every bench: figures are only comparable on one.

    from machine import describe
    print(describe())
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU model, cores (usable), memory, load, OS, Python, torch and GPU where present."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu_model()}, {os.cpu_count()} logical cores ({usable} usable)"]
    try:
        import psutil

        parts.append(f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        parts.append("load %.2f %.2f %.2f" % os.getloadavg())  # a busy machine gives slower figures
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        parts.append(f"torch {torch.__version__}, {gpu}")
    except ImportError:
        pass
    return "machine: " + "; ".join(parts)


if __name__ == "__main__":
    print(describe())
