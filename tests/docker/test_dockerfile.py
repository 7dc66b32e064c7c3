"""docker/Dockerfile, read without a Docker engine: the parser, then every promise of the image, each shown to fail."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

from tests.docker import dockerfile as d
from tests.docker.repo import ROOT, packages, pyproject

DOCKERFILE = ROOT / "docker" / "Dockerfile"
VARIANTS = ("gpu", "cpu")
COMMAND = ["clipbank", "serve"]  # the README's server command
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
VERSION_ARGS = {"torch": "TORCH_VERSION", "torchvision": "TORCHVISION_VERSION"}


def torch_problems(df: d.Dockerfile) -> list[str]:
    """Torch comes at the version pyproject.toml allows, from the CUDA base or the CPU wheel index, never replaced."""
    wanted = {r.name: r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    problems = []
    versions = {name: df.global_args.get(arg) or "" for name, arg in VERSION_ARGS.items()}
    for name, version in versions.items():
        if version not in wanted[name].specifier:
            problems.append(f"{name} {version!r} is outside pyproject's {name}{wanted[name].specifier}")
    gpu = df.stage("gpu-torch")
    if gpu is None or not gpu.base.split(":")[-1].startswith(versions["torch"] + "-cuda"):
        problems.append(f"the CUDA base {gpu and gpu.base} does not carry torch {versions['torch']}")
    cpu = df.stage("cpu-torch")
    cpu_runs = [i.args for i in cpu.instructions if i.keyword == "RUN"] if cpu else []
    pins = ('"torch==${TORCH_VERSION}"', '"torchvision==${TORCHVISION_VERSION}"', CPU_INDEX)
    if not any(all(p in run for p in pins) for run in cpu_runs):
        problems.append(f"the cpu-torch stage does not install {pins}")
    installs = [i.args for i in df.stages[-1].instructions if i.keyword == "RUN" and "pip install" in i.args]
    if not any("--constraint" in run and "torch==%s" in run for run in installs):
        problems.append("the project is installed without a constraint that keeps the base's torch")
    return problems


def project_problems(df: d.Dockerfile) -> list[str]:
    """The wheel stage builds the project from pyproject.toml with every package pyproject ships."""
    stage = df.stage("wheel")
    if stage is None:
        return ["no wheel stage"]
    copied = {w.rstrip("/") for i in stage.instructions if i.keyword == "COPY" for w in i.args.split()[:-1]}
    problems = [f"{f} is not copied into the wheel stage" for f in ("pyproject.toml", "README.md") if f not in copied]
    problems += [f"package {p} is not copied into the wheel stage" for p in packages() if p not in copied]
    if not any(i.keyword == "RUN" and "pip wheel" in i.args and i.args.endswith(" .") for i in stage.instructions):
        problems.append("the wheel stage does not build the project (`pip wheel ... .`)")
    return problems


def all_problems(text: str) -> list[str]:
    """Every promise, for every variant: what tests/docker reports about a Dockerfile's text."""
    df = d.parse(text)
    problems = torch_problems(df) + project_problems(df)
    for variant in VARIANTS:
        args = {"VARIANT": variant}
        image = df.image(args)
        if not any(s.name == f"{variant}-torch" for s in df.chain(df.stages[-1], args)):
            problems.append(f"VARIANT={variant} does not build on the {variant}-torch stage")
        problems += d.user_problems(image) + d.command_problems(image, COMMAND)
        problems += d.healthcheck_problems(image, d.env_values(image).get("CLIPBANK_PORT", "?"))
        problems += d.storage_problems(image) + d.base_problems(df, args) + d.prefetch_problems(df, image)
    return sorted(set(problems))


# ------------------------------------------------------------------------------------------------ the parser


def test_parser_joins_continuations_and_skips_comments():
    text = (
        "# escape=\\\n"
        "ARG BASE=python:3.11.15-slim-trixie\n"
        "FROM ${BASE} AS one\n"
        "RUN echo a \\\n"
        "  # a comment inside the continuation\n"
        "    && echo b\n"
        "\n"
        "COPY --from=one --chown=1:1 /a /b\n"
        'HEALTHCHECK --interval=5s CMD ["python", "-c", "print(1)"]\n'
        'ENTRYPOINT ["clipbank", "serve"]\n'
        "FROM one\n"
        "env A=1 B='two words'\n"
    )
    df = d.parse(text)
    assert df.global_args == {"BASE": "python:3.11.15-slim-trixie"}
    assert [(s.name, df.resolve(s.base)) for s in df.stages] == [("one", "python:3.11.15-slim-trixie"), (None, "one")]
    run, copy, check, entry = df.stages[0].instructions
    assert (run.keyword, run.args, run.line) == ("RUN", "echo a     && echo b", 4)
    assert copy.flags == {"from": "one", "chown": "1:1"} and copy.args == "/a /b"
    assert check.flags == {"interval": "5s"} and check.args.startswith("CMD [")
    assert entry.exec_form == ["clipbank", "serve"] and run.exec_form is None
    assert d.env_values(df.image()) == {"A": "1", "B": "two words"}
    assert [s.name for s in df.chain(df.stages[1])] == ["one", None]
    with pytest.raises(ValueError, match="only ARG"):
        d.parse("RUN true\nFROM x:1.2.3\n")


# ------------------------------------------------------------------------------------------------ the promises


def test_the_dockerfile_keeps_every_promise():
    assert all_problems(DOCKERFILE.read_text()) == []


BREAKS = [
    ("root user", ("USER 10001:10001", "USER root"), "(root)"),
    ("no user", ("USER 10001:10001\n", ""), "no USER"),
    ("user only after the entrypoint", ("USER 10001:10001\n", ""), "no USER", True),
    ("shell-form entrypoint", ('ENTRYPOINT ["clipbank", "serve"]', "ENTRYPOINT clipbank serve"), "shell form"),
    ("another command", ('ENTRYPOINT ["clipbank", "serve"]', 'ENTRYPOINT ["clipbank", "demo"]'), "not ['clipbank'"),
    ("health on /healthz", ("/readyz'", "/healthz'"), "/readyz"),
    ("no healthcheck", ("HEALTHCHECK --interval", "# HEALTHCHECK --interval"), "no HEALTHCHECK"),
    ("untagged base", ("FROM python:3.11.15-slim-trixie AS wheel", "FROM python AS wheel"), "no tag"),
    ("floating tag", ("python:3.11.15-slim-trixie AS cpu-torch", "python:3.11-slim AS cpu-torch"), "exact version"),
    ("latest", ("pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime", "pytorch/pytorch:latest"), "exact version"),
    ("torch above the pin", ("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.15.0"), "outside pyproject"),
    ("CUDA base off the pin", ("pytorch:2.14.1-cuda12.6", "pytorch:2.13.0-cuda12.6"), "does not carry torch"),
    ("cpu torch unpinned", ('"torch==${TORCH_VERSION}"', "torch"), "cpu-torch stage does not install"),
    ("torch replaceable", ("--constraint /tmp/torch-pins.txt ", ""), "without a constraint"),
    ("prefetch by default", ("ARG PREFETCH_WEIGHTS=0", "ARG PREFETCH_WEIGHTS=1"), "defaults to '1'"),
    ("ungated download", ('case "${PREFETCH_WEIGHTS}" in', 'case "${PREFETCH}" in'), "without looking"),
    (
        "weights copied in",
        ("COPY pyproject.toml README.md ./", "COPY pyproject.toml README.md w.safetensors ./"),
        "weights",
    ),
    ("store not a volume", ('VOLUME ["/data/store", "/data/cache"]', 'VOLUME ["/data/cache"]'), "CLIPBANK_STORE"),
    ("cache not a volume", ('VOLUME ["/data/store", "/data/cache"]', 'VOLUME ["/data/store"]'), "cache VOLUME"),
    ("loopback host", ("CLIPBANK_HOST=0.0.0.0", "CLIPBANK_HOST=127.0.0.1"), "must bind 0.0.0.0"),
    ("package left out", ("COPY service/ service/\n", ""), "package service"),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_promise_can_fail(case):
    _, (old, new), expected, *move_user_to_end = case
    text = DOCKERFILE.read_text()
    assert old in text, f"the mutation's anchor {old!r} is gone from the Dockerfile"
    text = text.replace(old, new, 1)
    if move_user_to_end:
        text += "USER 10001:10001\n"
        expected = "before ENTRYPOINT"
    problems = all_problems(text)
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
