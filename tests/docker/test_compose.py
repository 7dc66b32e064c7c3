"""compose.yaml: valid by the Compose Specification's schema, and keeping its promises, each shown to fail."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from typing import Any

import pytest
from jsonschema import Draft7Validator

from tests.docker import composefile as c
from tests.docker import dockerfile as d
from tests.docker.repo import ROOT

COMPOSE = ROOT / "compose.yaml"
SPEC = ROOT / "tests" / "docker" / "compose-spec"
ENV_EXAMPLE = ROOT / ".env.example"
TOKEN = "t0ken-for-the-tests-0123456789abcdef"
GPU, CPU = "clipbank", "clipbank-cpu"
BACKBONE = "ViT-B-16:openai"


def config_names() -> set[str]:
    """Every variable `ServeConfig.from_env` reads: CLIPBANK_ plus a field name of ServeConfig or Limits."""
    from service.config import ENV_PREFIX, Limits, ServeConfig

    return {ENV_PREFIX + f.name.upper() for k in (ServeConfig, Limits) for f in fields(k) if f.name != "limits"}


def example_names() -> dict[str, str]:
    """NAME: value of each line of .env.example, commented out or not."""
    lines = (re.match(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line) for line in ENV_EXAMPLE.read_text().splitlines())
    return {m.group(1): m.group(2) for m in lines if m}


def image() -> list[d.Instruction]:
    return d.parse((ROOT / "docker" / "Dockerfile").read_text()).image({"VARIANT": "gpu"})


def problems(raw: dict[str, Any]) -> list[str]:
    """Every promise of the compose file, on the document as loaded (before interpolation)."""
    out = []
    try:
        doc = c.interpolate(raw, {"CLIPBANK_ADMIN_TOKEN": TOKEN})
    except c.MissingVariable as e:
        return [str(e)]
    if c.active_services(doc) != [GPU]:
        out.append(f"`docker compose up` starts {c.active_services(doc)}, not only {GPU}")
    if c.active_services(doc, ("cpu",), (CPU,)) != [CPU]:
        out.append(f"`docker compose --profile cpu up {CPU}` starts {c.active_services(doc, ('cpu',), (CPU,))}")
    out += c.gpu_problems(doc["services"][GPU]) + c.cpu_problems(doc["services"][CPU])
    env = d.env_values(image())
    store, cache = env["CLIPBANK_STORE"], d.volume_of(env["HF_HOME"], d.volumes(image()))
    known = config_names()
    for name, service in doc["services"].items():
        out += [f"{name}: {p}" for p in c.volume_problems(doc, service, {"store": store, "model cache": cache})]
        out += [f"{name}: {p}" for p in c.secret_problems(raw["services"][name], ".env")]
        out += [f"{name}: {p}" for p in c.healthcheck_problems(service, env["CLIPBANK_PORT"])]
        variables = c.environment(service)
        unknown = [n for n in variables if n.startswith("CLIPBANK_") and n not in known]
        out += [f"{name}: {n} is not a server setting" for n in unknown]
        if variables.get("CLIPBANK_BACKBONE") != BACKBONE:
            out.append(f"{name}: serves {variables.get('CLIPBANK_BACKBONE')}, not {BACKBONE}")
        if variables.get("CLIPBANK_STORE", store) != store:
            out.append(f"{name}: CLIPBANK_STORE={variables['CLIPBANK_STORE']} is not the store volume {store}")
        out += port_problems(name, service, variables.get("CLIPBANK_PORT", env["CLIPBANK_PORT"]))
    return out


def port_problems(name: str, service: dict[str, Any], port: str) -> list[str]:
    """The server's port is published, on the host's loopback unless PUBLISH_ADDR says otherwise."""
    ports = [p for p in service.get("ports", []) if isinstance(p, dict) and str(p.get("target")) == port]
    if not ports:
        return [f"{name}: container port {port} is not published (long syntax)"]
    if ports[0].get("host_ip") != "127.0.0.1":
        return [f"{name}: the port is published on {ports[0].get('host_ip') or 'every address'}, not 127.0.0.1"]
    return []


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return c.load(COMPOSE)


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((SPEC / "compose-spec.json").read_text())
    assert "draft-07" in schema["$schema"]
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def schema_errors(validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ------------------------------------------------------------------------------------------------ the schema


def test_the_schema_is_vendored_with_its_licence(validator):
    assert validator.schema["title"] == "Compose Specification"
    assert "Apache License" in (SPEC / "LICENSE").read_text()
    assert "Compose Specification" in (SPEC / "NOTICE").read_text()
    assert "170098ba07d9f53c383a41bfd4c5166b0a4529a6" in (SPEC / "README.md").read_text()


def test_compose_file_follows_the_specification(raw, validator):
    assert schema_errors(validator, raw) == []
    assert schema_errors(validator, c.interpolate(raw, {"CLIPBANK_ADMIN_TOKEN": TOKEN})) == []


def _drop_capabilities(doc):
    doc["services"][GPU]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc["services"][GPU].update(enviroment={"CLIPBANK_DEVICE": "cuda"}),  # a typo
        lambda doc: doc["services"][GPU]["deploy"]["resources"]["reservations"].update(gpus=1),
        _drop_capabilities,  # the spec requires capabilities on a device reservation
        lambda doc: doc["services"][GPU]["healthcheck"].update(retries=[3]),
        lambda doc: doc.update(servics={}),
        lambda doc: doc["services"][GPU]["env_file"][0].update(optional=True),
    ],
    ids=[
        "unknown service key",
        "unknown reservation key",
        "no capabilities",
        "wrong type",
        "top-level typo",
        "env_file",
    ],
)
def test_the_schema_rejects_broken_documents(raw, validator, edit):
    doc = copy.deepcopy(raw)
    edit(doc)
    assert schema_errors(validator, doc)


# ------------------------------------------------------------------------------------------------ the promises


def test_compose_file_keeps_every_promise(raw):
    assert problems(raw) == []


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


BREAKS = [
    ("no GPU reserved", _set(f"services/{GPU}/deploy", "-"), "driver nvidia"),
    ("amd driver", _set(f"services/{GPU}/deploy/resources/reservations/devices/0/driver", "amd"), "driver nvidia"),
    ("no GPU counted", _set(f"services/{GPU}/deploy/resources/reservations/devices/0/count", 0), "count 0"),
    ("GPU service on cpu", _set(f"services/{GPU}/environment/CLIPBANK_DEVICE", "cpu"), "not cuda"),
    ("CPU service with a GPU", _set(f"services/{CPU}/gpus", "all"), "asks for GPUs"),
    ("CPU service on cuda", _set(f"services/{CPU}/environment/CLIPBANK_DEVICE", "cuda"), "not cpu"),
    ("CPU service by default", _set(f"services/{CPU}/profiles", "-"), "`docker compose up` starts"),
    ("GPU service in the profile", _set(f"services/{GPU}/profiles", ["cpu"]), "`docker compose up` starts"),
    ("literal token", _set(f"services/{GPU}/environment/CLIPBANK_ADMIN_TOKEN", "s3cret-s3cret-s3cret"), "has a value"),
    ("literal classify token", _set(f"services/{CPU}/environment/CLIPBANK_CLASSIFY_TOKEN", "abc"), "has a value"),
    ("no env file", _set(f"services/{GPU}/env_file", "-"), "env_file does not require .env"),
    ("optional env file", _set(f"services/{GPU}/env_file/0/required", False), "env_file does not require .env"),
    ("no healthcheck", _set(f"services/{GPU}/healthcheck", "-"), "no healthcheck"),
    (
        "liveness only",
        _set(f"services/{CPU}/healthcheck/test/3", "urlopen('http://127.0.0.1:8000/healthz')"),
        "/readyz",
    ),
    ("store on a bind mount", _set(f"services/{GPU}/volumes/0", "./store:/data/store"), "not a named volume"),
    ("cache not mounted", _set(f"services/{CPU}/volumes/1", "-"), "model cache (/data/cache) is not mounted"),
    ("volume undeclared", _set("volumes/clipbank-store", "-"), "not a named volume declared"),
    ("typo in a setting", _set(f"services/{GPU}/environment/CLIPBANK_MAX_BATCHES", "8"), "not a server setting"),
    ("other backbone", _set(f"services/{GPU}/environment/CLIPBANK_BACKBONE", "tiny"), "not ViT-B-16:openai"),
    ("store elsewhere", _set(f"services/{GPU}/environment/CLIPBANK_STORE", "/store"), "is not the store volume"),
    ("public port", _set(f"services/{GPU}/ports/0/host_ip", "0.0.0.0"), "not 127.0.0.1"),
    ("port unpublished", _set(f"services/{CPU}/ports", "-"), "is not published"),
    (
        "token unguarded",
        _set(f"services/{GPU}/environment/CLIPBANK_ADMIN_TOKEN", "${CLIPBANK_ADMIN_TOKEN:-x}"),
        "has a",
    ),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_promise_can_fail(raw, case):
    _, edit, expected = case
    doc = copy.deepcopy(raw)
    doc["services"] = {name: copy.deepcopy(service) for name, service in doc["services"].items()}  # unshare anchors
    for service in doc["services"].values():
        service["environment"] = dict(service["environment"])
    edit(doc)
    found = problems(doc)
    assert any(expected in p for p in found), found


def test_the_token_is_required_and_comes_from_dot_env(raw):
    for env in ({}, {"CLIPBANK_ADMIN_TOKEN": ""}):
        with pytest.raises(c.MissingVariable, match="CLIPBANK_ADMIN_TOKEN"):
            c.interpolate(raw, env)
    assert example_names()["CLIPBANK_ADMIN_TOKEN"] == "", ".env.example must not carry a token"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_settings_are_ones_the_server_reads(raw):
    known, example = config_names(), example_names()
    unknown = [n for n in example if n.startswith("CLIPBANK_") and n not in known]
    assert unknown == [], f".env.example names settings the server does not read: {unknown}"
    undocumented = sorted(c.variables(raw) - set(example))
    assert undocumented == [], f"compose.yaml interpolates variables .env.example does not show: {undocumented}"


@pytest.mark.parametrize("name", [GPU, CPU])
def test_each_service_environment_is_a_valid_server_config(raw, name):
    from service.config import ServeConfig

    env = c.environment(c.interpolate(raw, {"CLIPBANK_ADMIN_TOKEN": TOKEN})["services"][name])
    config = ServeConfig.from_env({k: v for k, v in env.items() if v is not None})
    store = d.env_values(image())["CLIPBANK_STORE"]
    assert (config.backbone, config.host, config.port, config.store) == (BACKBONE, "0.0.0.0", 8000, store)
    assert config.admin_token == TOKEN and config.device == ("cuda" if name == GPU else "cpu")


def test_publish_address_and_port_come_from_dot_env(raw):
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, "PUBLISH_ADDR": "0.0.0.0", "PUBLISH_PORT": "9000"}
    (port,) = c.interpolate(raw, env)["services"][GPU]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "9000", 8000)


def test_services_build_the_dockerfile_variants_and_prefetch_what_they_serve(raw):
    df = d.parse((ROOT / "docker" / "Dockerfile").read_text())
    for name, variant in ((GPU, "gpu"), (CPU, "cpu")):
        build = raw["services"][name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == (ROOT / "docker" / "Dockerfile")
        assert build["args"]["VARIANT"] == variant
        assert f"{variant}-torch" in [s.name for s in df.chain(df.stages[-1], build["args"])]
    assert d.stage_args(df.stages[-1].instructions)["PREFETCH_BACKBONE"] == BACKBONE


def test_named_volumes_have_fixed_names(raw):
    """`docker run -v clipbank-store:...` in the docs (backups) finds the same volume whatever the project name."""
    assert {k: v.get("name") for k, v in raw["volumes"].items()} == {
        "clipbank-store": "clipbank-store",
        "clipbank-cache": "clipbank-cache",
    }


def test_the_deployment_docs_name_real_settings():
    text = (ROOT / "docs" / "deployment.md").read_text()
    named = set(re.findall(r"`(CLIPBANK_[A-Z_]+)", text)) - {"CLIPBANK_URL"}  # the client's variable
    assert named and named <= config_names(), sorted(named - config_names())
