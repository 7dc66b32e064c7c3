"""A small Dockerfile parser (comments, line continuations, flags, exec form, stages) and the image's promises."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

ARG_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword, leading `--flag=value` options, and its arguments (raw and, if JSON, as a list)."""

    keyword: str
    flags: dict[str, str]
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array form (`["a", "b"]`), or None for the shell form."""
        if not self.args.startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    """A build stage: `FROM base [AS name]` and the instructions up to the next FROM."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    line: int = 0


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def resolve(self, text: str, build_args: dict[str, str] | None = None) -> str:
        """Substitute global ARGs (their defaults, or `build_args`) the way FROM lines see them."""
        values = {**{k: v or "" for k, v in self.global_args.items()}, **(build_args or {})}
        return ARG_REF.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)

    def chain(self, stage: Stage, build_args: dict[str, str] | None = None) -> list[Stage]:
        """The stage and the stages it is built on, base first (external images end the chain)."""
        chain = [stage]
        while (parent := self.stage(self.resolve(chain[0].base, build_args))) is not None:
            if parent in chain:
                raise ValueError(f"stage {parent.name} is its own ancestor")
            chain.insert(0, parent)
        return chain

    def image(self, build_args: dict[str, str] | None = None, target: str | None = None) -> list[Instruction]:
        """Every instruction that shapes the final image of `target` (default: the last stage), base first."""
        stage = self.stage(target) if target else self.stages[-1]
        if stage is None:
            raise ValueError(f"no stage named {target}")
        return [i for s in self.chain(stage, build_args) for i in s.instructions]

    def external_bases(self, build_args: dict[str, str] | None = None) -> list[str]:
        names = {s.name for s in self.stages if s.name}
        return [b for b in (self.resolve(s.base, build_args) for s in self.stages) if b not in names]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each instruction: comments dropped, continuations joined as Docker joins them."""
    escape = "\\"
    lines = text.splitlines()
    for raw in lines:  # parser directives: leading `# key=value` comments
        m = re.match(r"#\s*(\w+)\s*=\s*(\S+)\s*$", raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    out: list[tuple[int, str]] = []
    current, start = "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue  # a comment (or blank line) inside a continued instruction does not end it
        if not stripped:
            continue
        if not current:
            start = number
        if raw.rstrip().endswith(escape):
            current += raw.rstrip()[: -len(escape)]
            continue
        current += raw
        out.append((start, current.strip()))
        current = ""
    if current:
        out.append((start, current.strip()))
    return out


def split_flags(rest: str) -> tuple[dict[str, str], str]:
    """Leading `--name=value` (or bare `--name`) options, and what follows them."""
    flags: dict[str, str] = {}
    while (m := re.match(r"--([\w-]+)(?:=(\"[^\"]*\"|\S*))?\s*", rest)) is not None:
        flags[m.group(1)] = (m.group(2) or "").strip('"')
        rest = rest[m.end() :]
    return flags, rest.strip()


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile into global ARGs and stages; raise ValueError on what Docker would refuse."""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags, args = split_flags(rest.strip())
        inst = Instruction(keyword, flags, args, number)
        if keyword == "FROM":
            words = args.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise ValueError(f"line {number}: FROM needs `image [AS name]`, got {args!r}")
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None, [], number))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM, got {keyword}")
            for name, default in arg_defaults(args).items():
                global_args[name] = default
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(global_args, stages)


def arg_defaults(args: str) -> dict[str, str | None]:
    """`ARG A=1 B` -> {"A": "1", "B": None}."""
    out: dict[str, str | None] = {}
    for word in shlex.split(args):
        name, eq, default = word.partition("=")
        out[name] = default if eq else None
    return out


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV values the instructions set (`ENV A=1 B=2`; the legacy `ENV A 1` too), later ones winning."""
    env: dict[str, str] = {}
    for inst in instructions:
        if inst.keyword != "ENV":
            continue
        words = shlex.split(inst.args)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def stage_args(instructions: list[Instruction]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for inst in instructions:
        if inst.keyword == "ARG":
            out.update(arg_defaults(inst.args))
    return out


# ------------------------------------------------------------------------------------------------ the promises

ROOT_USERS = {"", "root", "0"}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ckpt", ".npz")
DOWNLOADERS = (
    "load_backbone",
    "create_model_and_transforms",
    "hf_hub_download",
    "snapshot_download",
    "from_pretrained",
)
EXACT_VERSION = re.compile(r"\d+\.\d+\.\d+")
PREFETCH_SWITCH = re.compile(r'(?:case|if \[|\[)\s+"?\$\{?PREFETCH_WEIGHTS\}?"?\s+(?:in|=)')  # a branch on it


def user_problems(image: list[Instruction]) -> list[str]:
    """The container's user, and the user in force at ENTRYPOINT/CMD, are set and are not root."""
    users = [(n, i.args.split(":")[0].strip()) for n, i in enumerate(image) if i.keyword == "USER"]
    if not users:
        return ["no USER instruction: the container would run as root"]
    problems = []
    if users[-1][1] in ROOT_USERS:
        problems.append(f"the last USER is {users[-1][1]!r} (root)")
    starts = [n for n, i in enumerate(image) if i.keyword in ("ENTRYPOINT", "CMD")]
    if starts and not any(n < starts[-1] and u not in ROOT_USERS for n, u in users):
        problems.append("no non-root USER is set before ENTRYPOINT/CMD")
    return problems


def command_problems(image: list[Instruction], expected: list[str]) -> list[str]:
    """ENTRYPOINT (+ CMD) in exec form, so the server is PID 1 and gets SIGTERM, and it is `expected`."""
    entry = [i for i in image if i.keyword == "ENTRYPOINT"]
    if not entry:
        return ["no ENTRYPOINT"]
    command = entry[-1].exec_form
    if command is None:
        return [f"ENTRYPOINT {entry[-1].args!r} is in shell form: /bin/sh would not pass SIGTERM on"]
    cmds = [i for i in image[image.index(entry[-1]) :] if i.keyword == "CMD"]  # ENTRYPOINT resets an earlier CMD
    if cmds:
        if cmds[-1].exec_form is None:
            return [f"CMD {cmds[-1].args!r} is in shell form"]
        command = command + cmds[-1].exec_form
    return [] if command == expected else [f"the container runs {command}, not {expected}"]


def healthcheck_problems(image: list[Instruction], port: str) -> list[str]:
    """A HEALTHCHECK that asks /readyz on the server's port, with a program the image has (python)."""
    checks = [i for i in image if i.keyword == "HEALTHCHECK"]
    if not checks:
        return ["no HEALTHCHECK"]
    keyword, _, rest = checks[-1].args.partition(" ")
    if keyword.upper() != "CMD":
        return [f"HEALTHCHECK is {checks[-1].args!r}"]
    command = Instruction("CMD", {}, rest.strip(), checks[-1].line).exec_form or shlex.split(rest)
    text = " ".join(command)
    problems = []
    if "/readyz" not in text:
        problems.append(f"HEALTHCHECK does not ask /readyz: {text!r}")
    if "127.0.0.1" not in text and "localhost" not in text:
        problems.append("HEALTHCHECK does not ask the container itself (127.0.0.1)")
    if port not in text and "CLIPBANK_PORT" not in text:
        problems.append(f"HEALTHCHECK does not use the server's port {port}")
    if not command or command[0] not in ("python", "python3"):
        problems.append(f"HEALTHCHECK runs {command[:1]}, not python (the images have no curl)")
    return problems


def volumes(image: list[Instruction]) -> list[str]:
    out: list[str] = []
    for inst in image:
        if inst.keyword == "VOLUME":
            out += inst.exec_form or inst.args.split()
    return [v.rstrip("/") for v in out]


def volume_of(path: str, declared: list[str]) -> str | None:
    return next((v for v in declared if path == v or path.startswith(v + "/")), None)


def storage_problems(image: list[Instruction]) -> list[str]:
    """The store and the model caches are volumes of their own; the server listens on every interface."""
    env, declared = env_values(image), volumes(image)
    problems = []
    store = env.get("CLIPBANK_STORE")
    if store is None or store.rstrip("/") not in declared:
        problems.append(f"CLIPBANK_STORE={store} is not a VOLUME ({declared})")
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME"):
        where = volume_of(env.get(name, ""), declared)
        if where is None or where == store:
            problems.append(f"{name}={env.get(name)} is not inside a cache VOLUME apart from the store ({declared})")
    link = f"ln -s {env.get('XDG_CACHE_HOME')} {env.get('HOME')}/.cache"  # open_clip's URL downloads: ~/.cache/clip
    if not any(i.keyword == "RUN" and link in i.args for i in image):
        problems.append(f"~/.cache is not linked into the cache volume ({link!r})")
    if env.get("CLIPBANK_HOST") != "0.0.0.0":
        problems.append(f"CLIPBANK_HOST={env.get('CLIPBANK_HOST')}: in a container the server must bind 0.0.0.0")
    exposed = [p.split("/")[0] for i in image if i.keyword == "EXPOSE" for p in i.args.split()]
    if env.get("CLIPBANK_PORT") not in exposed:
        problems.append(f"CLIPBANK_PORT={env.get('CLIPBANK_PORT')} is not EXPOSEd ({exposed})")
    return problems


def base_problems(df: Dockerfile, build_args: dict[str, str]) -> list[str]:
    """Every external base image carries an exact version tag (or a digest), never `latest` or nothing."""
    problems = []
    for image in df.external_bases(build_args):
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        if not tag:
            problems.append(f"FROM {image}: no tag")
        elif tag == "latest" or not EXACT_VERSION.match(tag):
            problems.append(f"FROM {image}: tag {tag!r} is not an exact version")
    return problems


def prefetch_problems(df: Dockerfile, image: list[Instruction]) -> list[str]:
    """No weights enter the image unless PREFETCH_WEIGHTS says so (its default is 0)."""
    problems = []
    args = stage_args(image)
    if args.get("PREFETCH_WEIGHTS", "missing") != "0":
        problems.append(f"ARG PREFETCH_WEIGHTS defaults to {args.get('PREFETCH_WEIGHTS', 'nothing')!r}, not 0")
    for inst in (i for s in df.stages for i in s.instructions):
        words = inst.exec_form or inst.args.split()
        if inst.keyword in ("COPY", "ADD") and any(w.endswith(WEIGHT_SUFFIXES) for w in words[:-1]):
            problems.append(f"line {inst.line}: {inst.keyword} brings weights into the image: {inst.args}")
        if inst.keyword == "ADD" and any(w.startswith(("http://", "https://")) for w in words):
            problems.append(f"line {inst.line}: ADD downloads {inst.args}")
        if inst.keyword == "RUN" and re.search(r"\b(curl|wget)\b", inst.args):
            problems.append(f"line {inst.line}: RUN downloads with curl/wget")
        if inst.keyword == "RUN" and any(d in inst.args for d in DOWNLOADERS) and not PREFETCH_SWITCH.search(inst.args):
            problems.append(f"line {inst.line}: RUN loads model weights without looking at PREFETCH_WEIGHTS")
    return problems
