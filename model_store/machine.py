"""The machine a benchmark ran on, for its report: figures from an Intel Xeon and an AMD EPYC of the same core
count differed by 1.5x per training step, and reports said only "x86_64"."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

# instruction sets that decide which kernels PyTorch and ONNX Runtime pick (bfloat16 and int8 ones especially)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
LIBRARIES = ("torch", "onnxruntime", "open_clip_torch", "numpy")


def _cpuinfo() -> tuple[str | None, list[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux), else (None, [])."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "Hardware", "cpu model"):
            model = value.strip() or None
        elif not flags and key in ("flags", "Features"):
            flags = value.split()
        if model and flags:
            break
    return model, [f for f in FLAGS if f in flags]


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU model and the flags of FLAGS it has, logical and usable CPUs, memory, OS, Python and library versions."""
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": _memory_gib(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "libraries": versions,
        "gpu": _gpu(),
    }


def _gpu() -> str | None:
    """The first CUDA device's name, "none", or None (unknown) when torch is not loaded: a report does not load it
    for this."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # a driver that fails here fails the run elsewhere, with its own message
        return None


def machine_line(facts: dict[str, Any]) -> str:
    """One sentence for a report's markdown: 'AMD EPYC (avx2, avx512_bf16), 2 of 2 CPUs, 23.4 GiB, ...'."""
    flags = f" ({', '.join(facts['cpu_flags'])})" if facts.get("cpu_flags") else ""
    libs = ", ".join(f"{k} {v}" for k, v in (facts.get("libraries") or {}).items())
    memory = f", {facts['memory_gib']} GiB" if facts.get("memory_gib") else ""
    gpu = {None: "", "none": ", no GPU"}.get(facts.get("gpu"), f", GPU {facts.get('gpu')}")
    return (
        f"{facts['cpu']}{flags}, {facts['usable_cpus']} of {facts['logical_cpus']} CPUs usable{memory}{gpu}; "
        f"{facts['os']}, Python {facts['python']}" + (f", {libs}" if libs else "")
    )
