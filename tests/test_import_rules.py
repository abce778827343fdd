"""DESIGN.md's one-way import rule, checked by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"model", "pipeline", "training", "orchestration"}
# package -> (project packages it may import, third-party top-level names it must not import)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "model": (set(), {"ray", "mlflow", "boto3", "botocore", "deepspeed", "webdataset", "timm"}),
    "pipeline": (set(), {"ray", "mlflow", "deepspeed"}),
    "training": ({"model"}, {"ray", "mlflow", "boto3", "botocore"}),
    "orchestration": (PROJECT - {"orchestration"}, set()),
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(package: str) -> list[str]:
    allowed, banned = RULES[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_top_levels(path):
            if name in PROJECT and name != package and name not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if name in banned:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(RULES))
def test_one_way_imports(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package}/ is missing"
    assert violations(package) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom orchestration.recipes import x\nimport boto3\n")
    assert imported_top_levels(bad) == {"os", "orchestration", "boto3"}
