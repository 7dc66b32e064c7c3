""".dockerignore: the build context holds the packages and their tiny weights, and none of the heavy or secret rest."""

from __future__ import annotations

import pytest

from tests.docker.dockerignore import is_ignored, load_patterns
from tests.docker.repo import ROOT, packages

IGNORE = ROOT / ".dockerignore"
LEFT_OUT = [
    ".git/HEAD",
    ".git/objects/ab/cdef",
    ".venv/bin/python",
    "venv/lib/python3.11/site-packages/x.py",
    ".env",
    ".env.local",
    "clipbank.egg-info/PKG-INFO",
    "clipbank-store/index.json",
    "clipbank-store/blobs/ab.safetensors",
    "clipbank-demo/store/index.json",
    "store/index.json",
    "runs/cl/report.json",
    ".benchmarks/x.json",
    ".pytest_cache/v/cache/lastfailed",
    ".ruff_cache/0.5/x",
    "tests/conftest.py",
    "docs/service.md",
    "data/textures/train/dots/0.png",
    "model_store/__pycache__/store.cpython-311.pyc",
    "service/app.pyc",
    "build/lib/service/app.py",
]
KEPT = [
    "pyproject.toml",
    "README.md",
    "model_store/tiny_clip/open_clip_model.safetensors",
    "model_store/tiny_clip/open_clip_config.json",
]


def context_problems(text: str) -> list[str]:
    patterns = load_patterns(text)
    problems = [f"{p} would enter the build context" for p in LEFT_OUT if not is_ignored(p, patterns)]
    sources = [str(f.relative_to(ROOT)) for p in packages() for f in (ROOT / p).rglob("*.py")]
    for path in KEPT + [s for s in sources if "__pycache__" not in s]:
        if is_ignored(path, patterns):
            problems.append(f"{path} is left out of the build context")
    return problems


def test_the_context_is_the_packages_and_nothing_heavy():
    assert context_problems(IGNORE.read_text()) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("!model_store/\n", ""), "model_store/tiny_clip/open_clip_model.safetensors is left out"),
        (lambda t: t + "**/*.safetensors\n", "open_clip_model.safetensors is left out"),
        (lambda t: t + "!.git\n", ".git/HEAD would enter"),
        (lambda t: t + "!.env*\n", ".env would enter"),
        (lambda t: t.replace("**/__pycache__\n", "").replace("**/*.py[cod]\n", ""), "store.cpython-311.pyc would"),
        (lambda t: t.replace("*\n", "", 1), ".venv/bin/python would enter"),
    ],
    ids=["weights lost", "all safetensors out", ".git back in", ".env back in", "bytecode in", "no default exclusion"],
)
def test_each_rule_can_fail(edit, expected):
    problems = context_problems(edit(IGNORE.read_text()))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "patterns, path, ignored",
    [
        ("*.md", "README.md", True),
        ("*.md", "docs/service.md", False),  # `*` stays within one folder
        ("**/*.md", "docs/x/service.md", True),
        ("**/*.md", "README.md", True),  # `**/` matches no folder too
        ("docs", "docs/x/service.md", True),  # a folder takes its contents along
        ("/docs/", "docs/service.md", True),  # leading and trailing slashes are cleaned away
        ("*\n!docs", "docs/service.md", False),  # the last matching pattern wins
        ("*\n!docs\ndocs/*.md", "docs/service.md", True),
        ("*.py[cod]", "a.pyc", True),
        ("*.py[cod]", "a.py", False),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
    ],
)
def test_matcher_follows_docker_rules(patterns, path, ignored):
    assert is_ignored(path, load_patterns(patterns)) is ignored
