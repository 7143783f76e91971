"""The package's layers import only downwards (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dtop

SRC = Path(dtop.__file__).parent

#: Lowest first. A module may import from its own package and from any earlier layer.
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "utils"},
    {"data", "models"},
    {"retrieval"},
    {"engine"},
    {"report"},
    {"apps"},
    {"cli"},
]
LEVEL = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _package(module: str) -> str | None:
    """``dtop.data.images`` -> ``data``; None for ``dtop`` itself and foreign modules."""
    parts = module.split(".")
    if parts[0] != "dtop" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``dtop`` module imported anywhere in ``path`` (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dtop":
                found += [(node.lineno, f"dtop.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC or p.name != "__init__.py")


def test_every_package_has_a_layer():
    packages = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in _modules()}
    assert packages <= set(LEVEL), f"packages without a layer: {packages - set(LEVEL)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    upward = []
    for line, module in _imports(path):
        target = _package(module)
        if target is None or target == own or target == "__version__":
            continue
        if target not in LEVEL:
            continue
        if LEVEL[target] >= LEVEL[own]:
            upward.append(f"line {line}: {module} (layer {LEVEL[target]}) from {own} (layer {LEVEL[own]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dtop.engine.extract import extract\n")
    assert _imports(bad) == [(2, "dtop.engine.extract")]
    assert LEVEL["engine"] > LEVEL["retrieval"]
