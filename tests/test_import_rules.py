"""docs/design.md's import rules, checked by reading every module's imports (lazy ones included).

1. One way between packages: confkit <- model <- training <- orchestration, confkit <- pipeline <-
   orchestration (confkit, the typed config sections, is stdlib-only and below everything).
2. Third-party imports of the lower packages come from an allow-list (model/ imports torch,
   safetensors, timm (the ViT family's zoo) and the standard library only), so a heavy or
   cluster-only dependency cannot creep into them unnoticed.
3. No import cycles between the project's modules, counting imports inside functions: a cycle
   hidden by a lazy import is still two modules that cannot be understood (or moved) apart.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("confkit", "model", "pipeline", "training", "orchestration")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# package -> project packages it may import
MAY_IMPORT: dict[str, set[str]] = {
    "confkit": set(),
    "model": {"confkit"},
    "pipeline": {"confkit"},
    "training": {"confkit", "model"},
    "orchestration": {"confkit", "model", "pipeline", "training"},
}
# package -> third-party top-level names it may import (None: any declared dependency)
THIRD_PARTY: dict[str, set[str] | None] = {
    "confkit": set(),
    "model": {"torch", "safetensors", "timm"},
    # _vitscale_jpeg: pipeline's own C extension (pipeline/_jpeg.c), top-level for the reason pipeline/decode.py gives
    "pipeline": {"torch", "torchvision", "numpy", "PIL", "pyarrow", "boto3", "botocore", "urllib3", "tqdm", "_vitscale_jpeg"},
    "training": {"torch", "deepspeed", "numpy", "safetensors"},
    "orchestration": None,
}
# Files with a documented extra: the demo-data maker reads scikit-learn's / scikit-image's
# bundled images (dev dependencies, never imported by the loader or the writer).
FILE_EXTRAS: dict[str, set[str]] = {"pipeline/demo_data.py": {"sklearn", "skimage"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> set[str]:
    """Absolute dotted names imported anywhere in ``path`` (``from a import b`` gives a.b and a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    current, is_package = module_name(path), path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, current, is_package)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in names if n}


def imported_top_levels(path: Path) -> set[str]:
    return {n.split(".")[0] for n in imports_of(path)}


def project_files() -> list[Path]:
    return sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py"))


def violations(package: str) -> list[str]:
    bad = []
    allowed = THIRD_PARTY[package]
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        extras = FILE_EXTRAS.get(rel, set())
        for name in sorted(imported_top_levels(path)):
            if name in PROJECT:
                if name != package and name not in MAY_IMPORT[package]:
                    bad.append(f"{rel} imports {name} (a {package}/ module may import {sorted(MAY_IMPORT[package])})")
            elif name not in STDLIB and allowed is not None and name not in allowed | extras:
                bad.append(f"{rel} imports {name} (not in {package}/'s allow-list {sorted(allowed)})")
    return bad


def module_graph(files: Iterable[Path]) -> dict[str, set[str]]:
    """Project module -> project modules it imports (packages' __init__ edges included)."""
    files = list(files)
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # `from orchestration import tracking` names a module; `from pipeline import Loader` the package.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)  # a module importing its own package's __init__ is no cycle
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("package", PROJECT)
def test_import_rules(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package}/ is missing"
    assert violations(package) == []


def test_no_import_cycles_lazy_imports_included() -> None:
    found = cycles(module_graph(project_files()))
    assert found == [], "import cycles (lazy imports count): " + "; ".join(" <-> ".join(c) for c in found)


def test_checker_catches_violations_and_cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom orchestration.recipes import x\nimport boto3\n")
    assert imported_top_levels(bad) == {"os", "orchestration", "boto3"}

    pkg = tmp_path / "model"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("import numpy\n\ndef f():\n    from model import b  # lazy\n    return b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    assert violations("model") == ["model/a.py imports numpy (not in model/'s allow-list ['safetensors', 'timm', 'torch'])"]
    assert cycles(module_graph(pkg.rglob("*.py"))) == [["model.a", "model.b"]]
