"""A small Dockerfile parser (comments, line continuations, flags, exec form, stages) and the promises of an image
that no run of it shows: pinned bases, no weights unless asked for, a CA bundle only ever as a build secret."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

ARG_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword, leading `--flag=value` options (in order; `--mount` may repeat), and its
    arguments (raw and, if JSON, as a list)."""

    keyword: str
    options: tuple[tuple[str, str], ...]
    args: str
    line: int

    @property
    def flags(self) -> dict[str, str]:
        """The options by name, a repeated one's last value winning."""
        return dict(self.options)

    def every(self, flag: str) -> list[str]:
        """Every value of a repeatable flag."""
        return [value for name, value in self.options if name == flag]

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

    @property
    def words(self) -> list[str]:
        return self.exec_form or self.args.split()


@dataclass
class Stage:
    """A build stage: `FROM base [AS name]` and the instructions up to the next FROM."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def instructions(self) -> list[Instruction]:
        return [i for s in self.stages for i in s.instructions]

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

    def external_bases(self) -> list[str]:
        """The images the stages start from (ARG defaults resolved), other than the stages themselves."""
        names = {s.name for s in self.stages if s.name}
        return [b for b in (self.resolve(s.base) for s in self.stages) if b not in names]


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
        if not stripped or stripped.startswith("#"):
            continue  # a comment (or blank line) inside a continued instruction does not end it
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


def split_flags(rest: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """Leading `--name=value` (or bare `--name`) options, in order, and what follows them."""
    options: list[tuple[str, str]] = []
    while (m := re.match(r"--([\w-]+)(?:=(\"[^\"]*\"|\S*))?\s*", rest)) is not None:
        options.append((m.group(1), (m.group(2) or "").strip('"')))
        rest = rest[m.end() :]
    return tuple(options), rest.strip()


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile into global ARGs and stages; raise ValueError on what Docker would refuse."""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        options, args = split_flags(rest.strip())
        if keyword == "FROM":
            words = args.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise ValueError(f"line {number}: FROM needs `image [AS name]`, got {args!r}")
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM, got {keyword}")
            global_args.update(arg_defaults(args))
        else:
            stages[-1].instructions.append(Instruction(keyword, options, args, number))
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

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ckpt", ".npz")
DOWNLOADERS = re.compile(r"load_backbone|create_model_and_transforms|hf_hub_download|snapshot_download|from_pretrained")
EXACT_VERSION = re.compile(r"\d+\.\d+\.\d+")
PREFETCH_SWITCH = re.compile(r'(?:case|if \[|\[)\s+"?\$\{?PREFETCH_WEIGHTS\}?"?\s+(?:in|=)')  # a branch on it
CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der", ".p12", ".pfx")
CA_VARIABLES = ("PIP_CERT", "PIP_CLIENT_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE")


def base_problems(df: Dockerfile) -> list[str]:
    """Every external base image carries an exact version tag (or a digest), never `latest` or nothing."""
    problems = []
    for image in df.external_bases():
        if "@sha256:" in image:
            continue
        _, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        if not tag:
            problems.append(f"FROM {image}: no tag")
        elif tag == "latest" or not EXACT_VERSION.match(tag):
            problems.append(f"FROM {image}: tag {tag!r} is not an exact version")
    return problems


def prefetch_problems(df: Dockerfile) -> list[str]:
    """No weights enter the image unless PREFETCH_WEIGHTS says so (its default is 0)."""
    problems = []
    args = stage_args(df.stages[-1].instructions)
    if args.get("PREFETCH_WEIGHTS", "missing") != "0":
        problems.append(f"ARG PREFETCH_WEIGHTS defaults to {args.get('PREFETCH_WEIGHTS', 'nothing')!r}, not 0")
    for inst in df.instructions():
        if inst.keyword in ("COPY", "ADD") and any(w.endswith(WEIGHT_SUFFIXES) for w in inst.words[:-1]):
            problems.append(f"line {inst.line}: {inst.keyword} brings weights into the image: {inst.args}")
        if inst.keyword == "ADD" and any(w.startswith(("http://", "https://")) for w in inst.words):
            problems.append(f"line {inst.line}: ADD downloads {inst.args}")
        if inst.keyword == "RUN" and re.search(r"\b(curl|wget)\b", inst.args):
            problems.append(f"line {inst.line}: RUN downloads with curl/wget")
        if inst.keyword == "RUN" and DOWNLOADERS.search(inst.args) and not PREFETCH_SWITCH.search(inst.args):
            problems.append(f"line {inst.line}: RUN loads model weights without looking at PREFETCH_WEIGHTS")
    return problems


def ca_problems(df: Dockerfile) -> list[str]:
    """A CA bundle for pip only ever comes as the optional BuildKit secret `ca`, mounted by every RUN that runs pip:
    never COPY/ADDed, never named by an ARG or ENV (build args and ENV stay in the image's history and config)."""
    problems = []
    named = [("before the first FROM", "ARG", n, v) for n, v in df.global_args.items()]
    for inst in df.instructions():
        if inst.keyword in ("COPY", "ADD") and any(cert_like(w) for w in inst.words[:-1]):
            problems.append(f"line {inst.line}: {inst.keyword} brings a certificate into the image: {inst.args}")
        if inst.keyword in ("ARG", "ENV"):
            values = arg_defaults(inst.args) if inst.keyword == "ARG" else env_values([inst])
            named += [(f"line {inst.line}", inst.keyword, n, v) for n, v in values.items()]
        if inst.keyword == "RUN" and re.search(r"\bpip\b", inst.args):
            mounts = [dict(o.partition("=")[::2] for o in m.split(",")) for m in inst.every("mount")]
            mount = next((m for m in mounts if (m.get("type"), m.get("id")) == ("secret", "ca")), None)
            if mount is None:
                problems.append(f"line {inst.line}: a RUN with pip does not mount the secret `ca`")
            elif mount.get("required", "false") != "false":
                problems.append(f"line {inst.line}: the secret `ca` is required (a build without a CA would fail)")
    for where, keyword, name, value in named:
        if name in CA_VARIABLES or cert_like(value or ""):
            problems.append(f"{where}: {keyword} {name} carries a certificate path into the image")
    return problems


def cert_like(path: str) -> bool:
    return path.lower().endswith(CERT_SUFFIXES) or "/certs" in path
