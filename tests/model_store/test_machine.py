"""The machine a benchmark ran on, as its reports record it."""

from __future__ import annotations

import os

from model_store import machine
from model_store.machine import FLAGS, machine_facts, machine_line


def test_the_facts_name_the_cpu_its_flags_and_the_libraries():
    facts = machine_facts()
    assert facts["cpu"] and facts["cpu"] not in ("", "x86_64") or not os.path.exists("/proc/cpuinfo")
    assert set(facts["cpu_flags"]) <= set(FLAGS)
    assert 1 <= facts["usable_cpus"] <= facts["logical_cpus"]
    assert facts["libraries"]["numpy"] and facts["python"].count(".") == 2
    line = machine_line(facts)
    assert line.startswith(facts["cpu"]) and f"of {facts['logical_cpus']} CPUs usable" in line


def test_cpuinfo_of_an_x86_and_an_arm_machine(tmp_path, monkeypatch):
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 xyz\n\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n"
    real_open = open
    for text, model, flags in (
        (x86, "AMD EPYC 9R14", ["avx2", "avx512f", "avx512_bf16"]),
        (arm, None, ["asimd", "sve"]),
    ):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(
            "builtins.open", lambda p, *a, **k: real_open(tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else p, *a, **k)
        )
        assert machine._cpuinfo() == (model, flags)
        monkeypatch.undo()
    facts = {"cpu": "X", "cpu_flags": [], "usable_cpus": 1, "logical_cpus": 4, "os": "Linux", "python": "3.11.7"}
    assert machine_line({**facts, "gpu": "none"}) == "X, 1 of 4 CPUs usable, no GPU; Linux, Python 3.11.7"
    assert (
        machine_line({**facts, "gpu": None, "memory_gib": 8.0})
        == "X, 1 of 4 CPUs usable, 8.0 GiB; Linux, Python 3.11.7"
    )
