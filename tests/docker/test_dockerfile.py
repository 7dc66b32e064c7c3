"""docker/Dockerfile, read without a Docker engine: the parser, then what a run of the image cannot show (torch pins,
base images and their overrides, weights, the CA secret), each promise shown to fail. docker/smoke.py (tests/container)
builds and runs the image for the rest: user, entrypoint, health check, volumes, the installed project."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.docker import dockerfile as d
from tests.docker.repo import ROOT, pyproject

DOCKERFILE = ROOT / "docker" / "Dockerfile"
VARIANTS = ("gpu", "cpu")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VERSION_ARGS = {"torch": "TORCH_VERSION", "torchvision": "TORCHVISION_VERSION"}
# The sources a host without Docker Hub or PyTorch's index overrides, and the stock ones they default to
SOURCES = {
    "PYTHON_BASE": (r"python:(\d+\.\d+\.\d+)-[\w.-]+", "Docker Hub's python:X.Y.Z-..."),
    "GPU_BASE": (r"pytorch/pytorch:[\w.-]+", "Docker Hub's pytorch/pytorch"),
}
BASES = {"wheel": "PYTHON_BASE", "cpu-torch": "PYTHON_BASE", "gpu-torch": "GPU_BASE"}


def torch_problems(df: d.Dockerfile) -> list[str]:
    """Torch comes at the version pyproject.toml allows, from the CUDA base or the CPU wheel index, never replaced."""
    wanted = {r.name: r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    problems = []
    versions = {name: df.global_args.get(arg) or "" for name, arg in VERSION_ARGS.items()}
    for name, version in versions.items():
        if version not in wanted[name].specifier:
            problems.append(f"{name} {version!r} is outside pyproject's {name}{wanted[name].specifier}")
    gpu = df.stage("gpu-torch")
    gpu_base = df.resolve(gpu.base) if gpu else None
    if gpu_base is None or not gpu_base.split(":")[-1].startswith(versions["torch"] + "-cuda"):
        problems.append(f"the CUDA base {gpu_base} does not carry torch {versions['torch']}")
    cpu = df.stage("cpu-torch")
    cpu_runs = [i.args for i in cpu.instructions if i.keyword == "RUN"] if cpu else []
    pins = ('"torch==${TORCH_VERSION}"', '"torchvision==${TORCHVISION_VERSION}"', '--index-url "${TORCH_INDEX_URL}"')
    if not any(all(p in run for p in pins) for run in cpu_runs):
        problems.append(f"the cpu-torch stage does not install {pins}")
    installs = [i.args for i in df.stages[-1].instructions if i.keyword == "RUN" and "pip install" in i.args]
    if not installs or not all("--constraint" in run and "torch==%s" in run for run in installs):
        problems.append(
            "the project or its dependencies are installed without a constraint that keeps the base's torch"
        )
    for variant in VARIANTS:
        if f"{variant}-torch" not in [s.name for s in df.chain(df.stages[-1], {"VARIANT": variant})]:
            problems.append(f"VARIANT={variant} does not build on the {variant}-torch stage")
    return problems


def source_problems(df: d.Dockerfile) -> list[str]:
    """PYTHON_BASE, GPU_BASE and TORCH_INDEX_URL choose every source, and default to Docker Hub's python (at a
    version pyproject allows), pytorch/pytorch and PyTorch's CPU index."""
    cpu = df.stage("cpu-torch")
    index = d.stage_args(cpu.instructions).get("TORCH_INDEX_URL", "missing") if cpu else "missing"
    problems = [] if index == CPU_INDEX else [f"ARG TORCH_INDEX_URL of cpu-torch is {index!r}, not {CPU_INDEX}"]
    for name, (pattern, stock) in SOURCES.items():
        default = df.global_args.get(name, "missing")
        if (m := re.fullmatch(pattern, default or "")) is None:
            problems.append(f"ARG {name} defaults to {default!r}, not {stock}")
        elif m.groups() and m.group(1) not in SpecifierSet(pyproject()["project"]["requires-python"]):
            problems.append(f"ARG {name}: Python {m.group(1)} is outside pyproject's requires-python")
    for stage, arg in BASES.items():
        found = df.stage(stage)
        if found is None or found.base != "${" + arg + "}":
            problems.append(f"the {stage} stage is not FROM ${{{arg}}} ({found and found.base})")
    return problems


def all_problems(text: str) -> list[str]:
    """Every promise: what tests/docker reports about a Dockerfile's text."""
    df = d.parse(text)
    problems = torch_problems(df) + source_problems(df) + d.base_problems(df)
    return sorted(set(problems + d.prefetch_problems(df) + d.ca_problems(df)))


# ------------------------------------------------------------------------------------------------ the parser


def test_parser_joins_continuations_and_skips_comments():
    text = (
        "# escape=\\\n"
        "ARG BASE=python:3.11.15-slim-trixie\n"
        "FROM ${BASE} AS one\n"
        "RUN --mount=type=secret,id=ca echo a \\\n"
        "  # a comment inside the continuation\n"
        "    && echo b\n"
        "\n"
        "COPY --from=one --chown=1:1 /a /b\n"
        "RUN --mount=type=bind,target=/w --mount=type=cache,target=/c true\n"
        'ENTRYPOINT ["clipbank", "serve"]\n'
        "FROM one\n"
        "env A=1 B='two words'\n"
    )
    df = d.parse(text)
    assert df.global_args == {"BASE": "python:3.11.15-slim-trixie"}
    assert [(s.name, df.resolve(s.base)) for s in df.stages] == [("one", "python:3.11.15-slim-trixie"), (None, "one")]
    run, copy, mounted, entry = df.stages[0].instructions
    assert (run.keyword, run.args, run.line) == ("RUN", "echo a     && echo b", 4)
    assert run.flags == {"mount": "type=secret,id=ca"}
    assert copy.flags == {"from": "one", "chown": "1:1"} and copy.args == "/a /b"
    assert mounted.every("mount") == ["type=bind,target=/w", "type=cache,target=/c"] and mounted.args == "true"
    assert entry.exec_form == ["clipbank", "serve"] and run.exec_form is None
    assert d.env_values(df.stages[1].instructions) == {"A": "1", "B": "two words"}
    assert [s.name for s in df.chain(df.stages[1])] == ["one", None]
    assert df.external_bases() == ["python:3.11.15-slim-trixie"]
    with pytest.raises(ValueError, match="only ARG"):
        d.parse("RUN true\nFROM x:1.2.3\n")


# ------------------------------------------------------------------------------------------------ the promises


def test_the_dockerfile_keeps_every_promise():
    assert all_problems(DOCKERFILE.read_text()) == []


PYTHON_BASE = "ARG PYTHON_BASE=python:3.11.15-slim-trixie"
SECRET = "RUN --mount=type=secret,id=ca,required=false \\\n"
BREAKS = [
    ("untagged base", (PYTHON_BASE, "ARG PYTHON_BASE=python"), "no tag"),
    ("floating tag", (PYTHON_BASE, "ARG PYTHON_BASE=python:3.11-slim"), "exact version"),
    ("latest", ("pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime", "pytorch/pytorch:latest"), "exact version"),
    ("torch above the pin", ("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.15.0"), "outside pyproject"),
    ("CUDA base off the pin", ("pytorch:2.14.1-cuda12.6", "pytorch:2.13.0-cuda12.6"), "does not carry torch"),
    ("cpu torch unpinned", ('"torch==${TORCH_VERSION}"', "torch"), "cpu-torch stage does not install"),
    ("cpu torch from PyPI", ('--index-url "${TORCH_INDEX_URL}"', ""), "cpu-torch stage does not install"),
    ("torch replaceable", ("--constraint /tmp/torch-pins.txt ", ""), "without a constraint"),
    ("torch replaceable by the project", ("--constraint /tmp/torch-pins.txt /mnt", "/mnt"), "without a constraint"),
    ("one variant only", ("FROM ${VARIANT}-torch AS runtime", "FROM gpu-torch AS runtime"), "VARIANT=cpu"),
    ("python base elsewhere", (PYTHON_BASE, PYTHON_BASE.replace("=", "=mirror.local/")), "ARG PYTHON_BASE"),
    ("python too old", (PYTHON_BASE, "ARG PYTHON_BASE=python:3.9.23-slim-trixie"), "requires-python"),
    ("GPU base elsewhere", ("ARG GPU_BASE=pytorch/pytorch:", "ARG GPU_BASE=nvidia/cuda:"), "ARG GPU_BASE"),
    ("CUDA index", ("whl/cpu\nRUN", "whl/cu126\nRUN"), "TORCH_INDEX_URL of cpu-torch"),
    ("no index arg", ("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n", ""), "TORCH_INDEX_URL"),
    ("python base fixed", ("FROM ${PYTHON_BASE} AS cpu", "FROM python:3.11.15-slim AS cpu"), "cpu-torch stage is not"),
    ("GPU base fixed", ("FROM ${GPU_BASE} AS", "FROM pytorch/pytorch:2.14.1-cuda12.6 AS"), "gpu-torch stage is not"),
    ("prefetch by default", ("ARG PREFETCH_WEIGHTS=0", "ARG PREFETCH_WEIGHTS=1"), "defaults to '1'"),
    ("ungated download", ('case "${PREFETCH_WEIGHTS}" in', 'case "${PREFETCH}" in'), "without looking"),
    ("weights copied in", ("COPY clipbank/ clipbank/", "COPY w.safetensors clipbank/ clipbank/"), "weights"),
    ("CA copied in", ("COPY clipbank/ clipbank/", "COPY corp-ca.pem clipbank/ clipbank/"), "brings a certificate"),
    ("CA trust store copied", ("ENV HOME=", "COPY --from=wheel /etc/ssl/certs/ /etc/ssl/\nENV HOME="), "certificate"),
    ("CA in ENV", ("PIP_BREAK_SYSTEM_PACKAGES=1", "PIP_CERT=/run/secrets/ca PIP_BREAK_SYSTEM_PACKAGES=1"), "ENV PIP"),
    ("CA path as build arg", ("ARG VARIANT=gpu", "ARG VARIANT=gpu\nARG CA_BUNDLE=/src/corp.crt"), "ARG CA_BUNDLE"),
    ("CA variable as build arg", ("ARG TORCH_VERSION\n", "ARG TORCH_VERSION\nARG PIP_CERT\n"), "ARG PIP_CERT"),
    ("pip without the secret", (SECRET, "RUN "), "does not mount the secret"),
    ("secret required", ("id=ca,required=false", "id=ca,required=true"), "is required"),
    ("secret gone beside a mount", ("\n    " + SECRET.removeprefix("RUN "), "\n"), "does not mount the secret"),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_promise_can_fail(case):
    _, (old, new), expected = case
    text = DOCKERFILE.read_text()
    assert old in text, f"the mutation's anchor {old!r} is gone from the Dockerfile"
    problems = all_problems(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------------------------ the prefetch switch


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell to run the RUN line")
@pytest.mark.parametrize("value", ["0", "1", "yes"])
def test_weights_are_fetched_only_when_asked(tmp_path, value):
    """Run the image's prefetch RUN line with a stand-in `python` that records whether it was called."""
    df = d.parse(DOCKERFILE.read_text())
    (run,) = [i for i in df.stages[-1].instructions if i.keyword == "RUN" and "PREFETCH_WEIGHTS" in i.args]
    args = d.stage_args(df.stages[-1].instructions)
    (tmp_path / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$CALLED"\n')
    (tmp_path / "python").chmod(0o755)
    called = tmp_path / "called"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CALLED": str(called), "PREFETCH_WEIGHTS": value}
    env["PREFETCH_BACKBONE"] = args["PREFETCH_BACKBONE"] or ""
    done = subprocess.run(["sh", "-c", run.args], env=env, capture_output=True, text=True, timeout=10)
    if value == "0":
        assert done.returncode == 0 and not called.exists()
    elif value == "1":
        assert done.returncode == 0, done.stderr
        assert "load_backbone" in called.read_text() and "ViT-B-16:openai" in called.read_text()
    else:
        assert done.returncode != 0 and "PREFETCH_WEIGHTS must be 0 or 1" in done.stderr
