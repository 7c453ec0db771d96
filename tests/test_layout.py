"""The layout the README describes: imports run one way, between packages and between the trainer's modules."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("preprocess", "shards", "train")


def imports(package: str) -> dict[str, list[tuple[str, bool]]]:
    """Per module of `package`: the first-party modules it imports, and whether the import sits in a function."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, package, name)).read())
        found: list[tuple[str, bool]] = []
        for func in [None, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            body = tree.body if func is None else func.body
            for node in (n for stmt in body for n in ast.walk(stmt)) if func else body:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found += [(n, func is not None) for n in names if n.split(".")[0] in PACKAGES]
        out[name[:-3]] = found
    return out


@pytest.mark.parametrize("package, forbidden", [("shards", ("preprocess", "train")), ("train", ("preprocess",)),
                                                ("preprocess", ("train",))])
def test_packages_import_one_way(package, forbidden):
    bad = [(m, n) for m, found in imports(package).items() for n, _ in found if n.split(".")[0] in forbidden]
    assert bad == []


def test_trainer_modules_form_no_circle_and_import_each_other_at_the_top():
    graph: dict[str, set[str]] = {}
    for module, found in imports("train").items():
        inner = [(n, in_func) for n, in_func in found if n.startswith("train.") or n == "train"]
        assert not [n for n, in_func in inner if in_func], f"train/{module}.py imports a train module in a function"
        graph[module] = {n.split(".")[1] for n, _ in inner if n.count(".") >= 1} & set(imports("train")) - {module}

    def visit(node: str, path: list[str]) -> None:
        for dep in graph[node]:
            assert dep not in path, f"import circle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
