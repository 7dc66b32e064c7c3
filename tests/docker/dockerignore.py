"""What a .dockerignore leaves out of the build context, by Docker's rules (moby/patternmatcher)."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool  # a `!pattern`: put back what an earlier pattern left out
    regex: re.Pattern[str]


def compile_pattern(text: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**` (any number of directories), anchored at the context root."""
    out, i = "", 0
    while i < len(text):
        c = text[i]
        if text.startswith("**", i):
            i += 2
            if text.startswith("/", i):  # `**/` matches zero or more directories
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = text.index("]", i)
            body = text[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(text):
            i += 1
            out += re.escape(text[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def load_patterns(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        line = line[1:].strip() if exclusion else line
        line = posixpath.normpath(line).lstrip("/")  # Docker cleans each pattern and drops a leading slash
        if line == ".":
            continue
        patterns.append(Pattern(line, exclusion, compile_pattern(line)))
    return patterns


def is_ignored(path: str, patterns: list[Pattern]) -> bool:
    """Whether `path` (relative, with /) stays out of the context: the last pattern matching it or a parent wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        if any(pattern.regex.match(p) for p in prefixes):
            ignored = not pattern.exclusion
    return ignored
