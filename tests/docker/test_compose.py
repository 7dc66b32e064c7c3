"""compose.yaml, resolved by the real Docker Compose (`docker-compose config`, no engine), keeping what a run of it
cannot show (the GPU reservation, profiles, secrets from .env only, the settings the server reads, ...), each promise
shown to fail. docker/smoke.py (tests/container) runs it for the rest: health check, user, volumes surviving `down`."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker import composefile as c
from tests.docker.repo import ROOT

COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
TOKEN = "t0ken-for-the-tests-0123456789abcdef"
GPU, CPU = "clipbank", "clipbank-cpu"
SERVES = {"backbone": "ViT-B-16:openai", "host": "0.0.0.0", "port": 8000, "store": "/data/store"}
VOLUMES = {"clipbank-store": "/data/store", "clipbank-cache": "/data/cache"}
PUBLISHED = {"PUBLISH_ADDR": "0.0.0.0", "PUBLISH_PORT": "9000"}  # what a .env may ask for instead of 127.0.0.1:8000
PUBLISH_TO = (SERVES["port"], *PUBLISHED.values())
REQUIRED = "required variable CLIPBANK_ADMIN_TOKEN is missing a value"  # compose's message for ${NAME:?...}

NOT_SETTINGS = {"CLIPBANK_URL", "CLIPBANK_CONTAINER_TESTS"}  # the client's variable; tests/container's switch
needs_compose = pytest.mark.skipif(c.missing() is not None, reason=c.missing() or "")


def config_names() -> set[str]:
    """Every variable `ServeConfig.from_env` reads: CLIPBANK_ plus a field name of ServeConfig or Limits, and the
    tokens' _FILE variants."""
    from service.config import ENV_PREFIX, TOKEN_FILES, Limits, ServeConfig

    names = {ENV_PREFIX + f.name.upper() for k in (ServeConfig, Limits) for f in fields(k) if f.name != "limits"}
    return names | {ENV_PREFIX + name + "_FILE" for name in TOKEN_FILES}


def example_names() -> dict[str, str]:
    """NAME: value of each line of .env.example, commented out or not."""
    lines = (re.match(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line) for line in ENV_EXAMPLE.read_text().splitlines())
    return {m.group(1): m.group(2) for m in lines if m}


def runs() -> dict[str, tuple[str | None, list[str]]]:
    """The compose runs every check needs: {name: (.env text, or None for no .env; compose's arguments)}."""
    resolve = ["--profile", "cpu", "config", "--format", "json"]  # all services, merged, interpolated, env files read
    published = "".join(f"{k}={v}\n" for k, v in PUBLISHED.items())
    return {
        "without .env": (None, resolve),
        "with .env.example as .env": (ENV_EXAMPLE.read_text(), resolve),
        "up": (f"CLIPBANK_ADMIN_TOKEN={TOKEN}\n", ["config", "--services"]),
        "up --profile cpu": (f"CLIPBANK_ADMIN_TOKEN={TOKEN}\n", resolve),
        "published": (f"CLIPBANK_ADMIN_TOKEN={TOKEN}\n{published}", resolve),
    }


def refusal_problems(done: dict[str, Any]) -> list[str]:
    """Compose stops for want of CLIPBANK_ADMIN_TOKEN without .env, and with .env.example copied as is (empty)."""
    problems = []
    for case in ("without .env", "with .env.example as .env"):
        if not isinstance(done[case], c.ComposeError):
            problems.append(f"compose runs {case}: it does not require a CLIPBANK_ADMIN_TOKEN")
        elif REQUIRED not in str(done[case]):
            problems.append(f"{case}, compose stops for another reason than the token: {done[case]}")
    return problems


def service_problems(service: dict[str, Any], device: str) -> list[str]:
    """The resolved environment is a valid server config serving what the image and the volumes expect; the port is
    published on 127.0.0.1:8000 when .env does not say otherwise."""
    from service.config import ServeConfig

    env = service.get("environment") or {}
    problems = [f"{n} is not a server setting" for n in env if n.startswith("CLIPBANK_") and n not in config_names()]
    try:
        config = ServeConfig.from_env({k: v for k, v in env.items() if v is not None})
    except ValueError as e:
        return [*problems, str(e)]
    want = {**SERVES, "device": device, "admin_token": TOKEN}
    problems += [f"serves {k}={getattr(config, k)!r}, not {v!r}" for k, v in want.items() if getattr(config, k) != v]
    return problems + c.port_problems(service, SERVES["port"], "127.0.0.1", str(SERVES["port"]))


def problems(folder: Path, text: str) -> list[str]:
    """Every promise of a compose file's text, run through compose in `folder`."""
    out = c.secret_problems(yaml.safe_load(text)) + c.env_file_problems(yaml.safe_load(text))
    done = c.run_all(folder, text, runs())
    out += refusal_problems(done)
    refused = [(k, done[k]) for k in ("up", "up --profile cpu", "published") if isinstance(done[k], c.ComposeError)]
    if refused:
        return out + [f"compose refuses the file ({k}): {e}" for k, e in refused]
    doc, published = json.loads(done["up --profile cpu"]), json.loads(done["published"])
    if (started := sorted(done["up"].split())) != [GPU]:
        out.append(f"`docker compose up` starts {started}, not only {GPU}")
    if sorted(doc["services"]) != [GPU, CPU]:
        return [*out, f"`docker compose --profile cpu up` starts {sorted(doc['services'])}, not {GPU} and {CPU}"]
    out += c.gpu_problems(doc["services"][GPU]) + c.cpu_problems(doc["services"][CPU])
    for name, service in doc["services"].items():
        found = service_problems(service, "cuda" if name == GPU else "cpu")
        found += c.volume_problems(doc, service, VOLUMES) + c.filesystem_problems(service)
        found += [f"{p} with {PUBLISHED} in .env" for p in c.port_problems(published["services"][name], *PUBLISH_TO)]
        out += [f"{name}: {p}" for p in found]
    return out


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------------------------------------ the promises


@needs_compose
def test_compose_file_keeps_every_promise(tmp_path):
    assert problems(tmp_path, COMPOSE.read_text()) == []


def _set(path: str, value: Any):
    """An edit that sets doc[a][b]...[z] = value (`-` deletes), indices as numbers."""

    def edit(doc):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        for key in parents:
            doc = doc[key]
        if value == "-":
            del doc[last]
        else:
            doc[last] = value

    return edit


def _token(value: str):
    """An edit that gives CLIPBANK_ADMIN_TOKEN `value` in the anchor and in every service that merged it."""

    def edit(doc):
        for env in [doc["x-environment"]] + [s["environment"] for s in doc["services"].values()]:
            env["CLIPBANK_ADMIN_TOKEN"] = value

    return edit


G, C = f"services/{GPU}", f"services/{CPU}"
A_GPU = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
BREAKS = [
    ("not compose", _set(f"{G}/enviroment", {"CLIPBANK_DEVICE": "cuda"}), "compose refuses the file"),
    ("no GPU reserved", _set(f"{G}/deploy", "-"), "driver nvidia"),
    ("amd driver", _set(f"{G}/deploy/resources/reservations/devices/0/driver", "amd"), "driver nvidia"),
    ("no GPU counted", _set(f"{G}/deploy/resources/reservations/devices/0/count", 0), "count 0"),
    ("GPU service on cpu", _set(f"{G}/environment/CLIPBANK_DEVICE", "cpu"), "serves device='cpu'"),
    ("CPU service with a GPU", _set(f"{C}/gpus", "all"), "asks for GPUs"),
    ("CPU reserves a GPU", _set(f"{C}/deploy", {"resources": {"reservations": {"devices": [A_GPU]}}}), "reserves"),
    ("CPU service on cuda", _set(f"{C}/environment/CLIPBANK_DEVICE", "cuda"), "serves device='cuda'"),
    ("CPU service by default", _set(f"{C}/profiles", "-"), "`docker compose up` starts"),
    ("GPU service in the profile", _set(f"{G}/profiles", ["cpu"]), "`docker compose up` starts"),
    ("CPU service elsewhere", _set(f"{C}/profiles", ["cpu-only"]), "--profile cpu"),
    ("literal token", _set(f"{G}/environment/CLIPBANK_ADMIN_TOKEN", "s3cret-s3cret-s3cret"), "has a value"),
    ("literal token in anchor", _set("x-environment/CLIPBANK_ADMIN_TOKEN", "s3cret-s3cret-s3cret"), "has a value"),
    ("literal classify token", _set(f"{C}/environment/CLIPBANK_CLASSIFY_TOKEN", "c1assify-c1assify-c1"), "has a value"),
    ("literal in a list", _set(f"{C}/environment", ["CLIPBANK_CLASSIFY_TOKEN=c1assify-c1assify-c1"]), "has a value"),
    ("token with a default", _token("${CLIPBANK_ADMIN_TOKEN:-x}"), "has a value"),
    ("token may be empty", _token("${CLIPBANK_ADMIN_TOKEN?set it}"), "with .env.example as .env: it does not"),
    ("token optional", _token("${CLIPBANK_ADMIN_TOKEN}"), "does not require a CLIPBANK_ADMIN_TOKEN"),
    ("no env file", _set(f"{G}/env_file", "-"), "env_file does not require .env"),
    ("optional env file", _set(f"{C}/env_file/0/required", False), "env_file does not require .env"),
    ("typo in a setting", _set(f"{G}/environment/CLIPBANK_MAX_BATCHES", "8"), "not a server setting"),
    ("invalid setting", _set(f"{C}/environment/CLIPBANK_MAX_BATCH", "0"), "max_batch must be"),
    ("other backbone", _set(f"{G}/environment/CLIPBANK_BACKBONE", "tiny"), "serves backbone='tiny'"),
    ("loopback bind", _set(f"{C}/environment/CLIPBANK_HOST", "127.0.0.1"), "serves host="),
    ("store elsewhere", _set(f"{G}/environment/CLIPBANK_STORE", "/store"), "serves store="),
    ("public port", _set(f"{G}/ports/0/host_ip", "0.0.0.0"), "published on ['0.0.0.0:8000']"),
    ("fixed address", _set(f"{C}/ports/0/host_ip", "127.0.0.1"), "in .env"),
    ("fixed port", _set(f"{G}/ports/0/published", "8000"), "in .env"),
    ("port unpublished", _set(f"{C}/ports", "-"), "published on nothing"),
    ("store on a bind mount", _set(f"{G}/volumes/0", "./store:/data/store"), "/data/store is not the volume"),
    ("cache not mounted", _set(f"{C}/volumes/1", "-"), "/data/cache is not the volume clipbank-cache"),
    ("volume name per project", _set("volumes/clipbank-store/name", "-"), "named 'clipbank_clipbank-store'"),
    ("writable root", _set(f"{G}/read_only", False), "read_only is None"),
    ("no tmpfs", _set(f"{C}/tmpfs", "-"), "no tmpfs on /tmp"),
]


@needs_compose
@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_promise_can_fail(tmp_path, raw, case):
    _, edit, expected = case
    doc = copy.deepcopy(raw)
    doc["services"] = {name: copy.deepcopy(service) for name, service in doc["services"].items()}  # unshare anchors
    edit(doc)
    found = problems(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    assert any(expected in p for p in found), found


# ------------------------------------------------------------------------------------------------ the settings files


def reference_cache() -> set[str]:
    """Where the reference sets live: model_store reads it (env_value) for the server; it is no server setting."""
    reads = (ROOT / "model_store" / "reference.py").read_text()
    return {"CLIPBANK_REFERENCE_CACHE"} if 'env_value("reference_cache")' in reads else set()


def test_dot_env_example_names_real_settings_and_no_token():
    example = example_names()
    assert example["CLIPBANK_ADMIN_TOKEN"] == "", ".env.example must not carry a token"
    unknown = [n for n in example if n.startswith("CLIPBANK_") and n not in config_names() | reference_cache()]
    assert unknown == [], f".env.example names settings the server does not read: {unknown}"
    undocumented = sorted(set(re.findall(r"\$\{(\w+)", COMPOSE.read_text())) - set(example))
    assert undocumented == [], f"compose.yaml interpolates variables .env.example does not show: {undocumented}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_the_deployment_docs_name_real_settings():
    text = (ROOT / "docs" / "deployment.md").read_text()
    named = {n for n in re.findall(r"`(CLIPBANK_[A-Z_]+)", text) if n not in NOT_SETTINGS and "_SMOKE_" not in n}
    cache = reference_cache()
    assert named and named <= config_names() | cache, sorted(named - config_names() - cache)
