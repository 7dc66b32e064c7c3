"""The house rules of docs/architecture.md, checked on the source: who may import whom, and how big things get."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("model_store", "service", "training")
# package -> top-level packages of this project it must never import
FORBIDDEN = {
    "model_store": {"service", "training", "benchmarks", "clipbank"},
    "service": {"training", "benchmarks", "clipbank"},
    "training": {"service", "benchmarks", "clipbank"},
    "benchmarks": {"clipbank"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _imported_packages(tree: ast.AST) -> set[str]:
    """Top-level names of every absolute import in the module, at any depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    bad = []
    for path in _sources(package):
        found = _imported_packages(ast.parse(path.read_text())) & FORBIDDEN[package]
        bad += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(found)]
    assert not bad, bad


def test_the_rule_checker_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from service.app import create_app\nimport clipbank.cli as c\n")
    assert _imported_packages(tree) == {"service", "clipbank"}


def test_no_module_or_function_is_too_long():
    too_long = []
    for path in _sources(*PRODUCT, "benchmarks", "clipbank"):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long


@pytest.mark.parametrize("package", PRODUCT)
def test_package_roots_name_their_public_verbs(package):
    module = importlib.import_module(package)
    assert module.__doc__ and module.__all__
    for name in module.__all__:
        assert callable(getattr(module, name)), name
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_verb  # noqa: B018


def test_importing_a_package_root_does_not_load_torch():
    code = "import sys, model_store, service, training, model_store.modes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_open_store_opens_folders_and_s3_and_refuses_other_schemes(tmp_path, monkeypatch):
    from model_store import open_store
    from model_store.errors import StoreError

    assert open_store(tmp_path / "s").index().tasks == {}
    monkeypatch.setenv("CLIPBANK_S3_CACHE_DIR", str(tmp_path / "cache"))
    s3 = open_store("s3://bucket/prefix")  # no request is made until it is used
    assert (type(s3).__name__, s3.location) == ("S3Store", "s3://bucket/prefix")
    with pytest.raises(StoreError, match="local folder or s3://"):
        open_store("gs://bucket/prefix")
