"""Reading compose.yaml as Docker Compose does (YAML merge keys, `${VAR}` interpolation, profiles) and its promises."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, ${NAME+alt}, $NAME, $$
INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


class MissingVariable(ValueError):
    """A `${NAME:?message}` whose variable is unset or empty: compose stops with the message."""


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Substitute variables everywhere in a loaded document, as `docker compose config` does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4) or ""
        have = env.get(name)
        is_set = have is not None and (have != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return have if is_set else arg
        if op in (":?", "?"):
            if not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return have
        if op in (":+", "+"):
            return arg if is_set else ""
        return have or ""

    return INTERPOLATION.sub(one, value)


def variables(value: Any) -> set[str]:
    """Names of the variables a document interpolates."""
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m.group(2) or m.group(5) for m in INTERPOLATION.finditer(value) if not m.group(1)}


def active_services(doc: dict[str, Any], profiles: tuple[str, ...] = (), targets: tuple[str, ...] = ()) -> list[str]:
    """What `docker compose [--profile P] up [TARGET...]` starts: the targets (their profiles are enabled by naming
    them) with their dependencies, or else every service without profiles plus those of the enabled profiles."""
    services = doc["services"]
    enabled = set(profiles) | {p for t in targets for p in services[t].get("profiles", [])}
    if targets:
        chosen, todo = set(), list(targets)
        while todo:
            name = todo.pop()
            if name not in chosen:
                chosen.add(name)
                todo += list(services[name].get("depends_on", []))
        return sorted(chosen)
    return sorted(n for n, s in services.items() if not s.get("profiles") or enabled & set(s["profiles"]))


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's `environment`, given as a mapping or as a list of NAME=value."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: (v if sep else None) for k, sep, v in (e.partition("=") for e in env)}
    return {k: None if v is None else str(v) for k, v in env.items()}


def gpu_reservations(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def gpu_problems(service: dict[str, Any]) -> list[str]:
    """The service reserves at least one NVIDIA GPU and serves on cuda."""
    problems = []
    nvidia = [d for d in gpu_reservations(service) if d.get("driver") == "nvidia"]
    if not nvidia:
        problems.append("no deploy.resources.reservations.devices entry with driver nvidia and capabilities [gpu]")
    for d in nvidia:
        count = d.get("count")
        if "device_ids" not in d and not (count == "all" or (isinstance(count, int) and count >= 1)):
            problems.append(f"the GPU reservation asks for count {count!r}")
    device = environment(service).get("CLIPBANK_DEVICE") or ""
    if not device.startswith("cuda"):
        problems.append(f"CLIPBANK_DEVICE={device!r}, not cuda")
    return problems


def cpu_problems(service: dict[str, Any]) -> list[str]:
    """A CPU service asks for no GPU at all and serves on cpu."""
    problems = []
    if service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"):
        problems.append("the CPU service reserves devices")
    if "gpus" in service or service.get("runtime") == "nvidia":
        problems.append("the CPU service asks for GPUs (gpus: or runtime: nvidia)")
    if environment(service).get("CLIPBANK_DEVICE") != "cpu":
        problems.append(f"CLIPBANK_DEVICE={environment(service).get('CLIPBANK_DEVICE')!r}, not cpu")
    return problems


def volume_problems(doc: dict[str, Any], service: dict[str, Any], needed: dict[str, str]) -> list[str]:
    """Each of `needed` ({what: container path}) is mounted from a named volume declared at the top level."""
    declared = doc.get("volumes") or {}
    mounts: dict[str, str] = {}
    for v in service.get("volumes", []):
        source, target = (v.get("source", ""), v.get("target", "")) if isinstance(v, dict) else v.split(":")[:2]
        mounts[target.rstrip("/")] = source
    problems = []
    for what, path in needed.items():
        source = mounts.get(path)
        if source is None:
            problems.append(f"the {what} ({path}) is not mounted")
        elif source not in declared:
            problems.append(f"the {what} ({path}) comes from {source!r}, not a named volume declared under volumes:")
    return problems


def secret_problems(service: dict[str, Any], env_file: str) -> list[str]:
    """Secrets come from `env_file` (required), never as values written in the compose file."""
    problems = []
    for name, value in environment(service).items():
        if not any(w in name for w in SECRET_WORDS) or value is None:
            continue
        if not re.fullmatch(r"\$\{" + name + r"(:?[?][^}]*)?\}", value):
            problems.append(f"{name} has a value in the compose file ({value!r}); it belongs in {env_file}")
    files = service.get("env_file", [])
    files = [files] if isinstance(files, str) else files
    entries = [f if isinstance(f, dict) else {"path": f} for f in files]
    if not any(e["path"] == env_file and e.get("required", True) in (True, "true") for e in entries):
        problems.append(f"env_file does not require {env_file} ({entries})")
    return problems


def healthcheck_problems(service: dict[str, Any], port: str) -> list[str]:
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return ["no healthcheck"]
    test = check.get("test", [])
    text = " ".join(test) if isinstance(test, list) else test
    if isinstance(test, list) and test[:1] not in (["CMD"], ["CMD-SHELL"]):
        return [f"healthcheck test {test[:1]} is not CMD or CMD-SHELL"]
    if f":{port}/readyz" not in text:
        return [f"the healthcheck does not ask /readyz on port {port}: {text!r}"]
    return []
