"""The settings of `clipbank bench serve` and `clipbank bench soak`, as plain dataclasses: cheap to import, so
the command line makes its flags from them (`clipbank/flags.py`) without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from model_store.settings import check_settings, option


@dataclass(frozen=True)
class ServeBenchJob:
    out: str = option("runs/bench-serve", "report.json, report.md and plots go here")
    quick: bool = option(False, "tiny backbone only, fewer levels and tasks (several minutes: each server kind, K)")
    tiny_only: bool = option(False, "skip the ViT-B-32-sized backbone")
    onnx: bool = option(True, "run the ONNX Runtime server beside the PyTorch one")
    litserve: bool = option(True, "run the LitServe peer (pip install 'clipbank[bench]') beside the naive baseline")
    prefix: bool = option(True, "measure auto mode with experts in the top K blocks (K = L, L/2, L/4), side by side")
    requests: int | None = option(None, "requests per load level, at most (default 400, quick 100)")
    max_seconds: float | None = option(None, "seconds per load level, at most (default 30, quick 10)")

    def __post_init__(self) -> None:
        check_settings(self, ("requests", "max_seconds"))


@dataclass(frozen=True)
class SoakJob:
    minutes: float | None = option(None, "measured soak after a 30 s warm-up (default 10; quick: 0.5 after 5 s)")
    clients: int | None = option(None, "concurrent clients, one connection each (default 16)")
    swap_seconds: float | None = option(None, "a store change every this many seconds (default 2)")
    hostile: int | None = option(None, "hostile clients beside 4 normal ones; 0 skips that phase (default 4)")
    out: str = option("runs/bench-soak", "report.json, report.md, plots and the server log")
    quick: bool = option(False, "about 2 minutes: a 30 s soak, 10 s hostile windows")

    def __post_init__(self) -> None:
        check_settings(self, ("minutes", "clients", "swap_seconds"), counts=("hostile",))


@dataclass(frozen=True)
class ScaleJob:
    out: str = option("runs/bench-scale", "report.json and report.md go here")
    quick: bool = option(False, "1 and 2 replicas, 8 s of load each, 10 swaps per mode (a few minutes)")

    def __post_init__(self) -> None:
        check_settings(self, ())
