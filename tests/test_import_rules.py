"""Who may import whom inside the package (docs/ARCHITECTURE.md, "Import rules").

Every module of ``bvvit/`` is parsed (not imported) and each of its imports of another
``bvvit`` module, lazy ones inside functions included, is checked against :data:`ALLOWED`:
the areas a module's area may import. Two more rules: no module imports another module's
private (``_underscore``) name, and a name taken from a module that declares ``__all__`` is
listed there: what is shared is public and says so.

A new top-level module or package must be given an area here, so the rules are decided
when it is added, not discovered later.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Leaf helpers: import no stage (only other leaves and the package root's __version__).
LEAVES = {"bvvit", "errors", "config", "io", "metrics", "system", "distributed", "plotting", "console",
          "run_dir"}
# The area of a top-level module or package of bvvit (bvvit.<name>...).
AREAS = {**{name: name for name in LEAVES}, "model": "model", "model_file": "model", "formats": "model", "data": "data",
         "quant": "quant", "evaluate": "evaluate", "runtime": "runtime", "train": "train", "ptq": "ptq",
         "report": "report", "cli": "cli"}
# What each area may import besides itself: arrows point one way, down the flow.
ALLOWED = {
    **{leaf: LEAVES for leaf in LEAVES},
    "data": LEAVES,
    "model": LEAVES,
    "quant": LEAVES | {"model"},
    "evaluate": LEAVES | {"model", "data", "quant"},
    "runtime": LEAVES | {"evaluate"},
    "train": LEAVES | {"model", "data", "evaluate"},
    "report": LEAVES,
    "ptq": LEAVES | {"model", "data", "quant", "evaluate", "runtime", "report"},
    "cli": LEAVES | {"model", "data", "quant", "evaluate", "runtime", "train", "ptq", "report"},
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str
    kind: str = "layer"  # layer: an arrow the wrong way; private: a private name shared; all: not in __all__

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in ``tree``, relative
    ones resolved against ``module``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([target] if target else []))
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def declared_all(tree: ast.Module) -> set[str] | None:
    """The names in a module's ``__all__`` (None when it declares none)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None


def check_package(package_dir: Path, allowed: dict[str, set[str]], areas: dict[str, str]) -> list[Violation]:
    """Every import of ``package_dir``'s modules that breaks ``allowed`` (by area), imports a
    private name of another module or a name missing from that module's ``__all__``, or
    comes from a module no area is given for."""
    root, package = package_dir.parent, package_dir.name
    paths = sorted(package_dir.rglob("*.py"))
    trees = {module_name(path, root): ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
             for path in paths}
    exported = {module: declared_all(tree) for module, tree in trees.items()}
    violations = []
    for path in paths:
        module = module_name(path, root)
        rel = path.relative_to(root).as_posix()
        parts = module.split(".")
        area = areas.get(parts[1] if len(parts) > 1 else package)
        if area is None:
            violations.append(Violation(rel, 1, f"{module} has no area in the import rules; add it"))
            continue
        for line, target, names in imported_modules(trees[module], module, path.name == "__init__.py"):
            target_parts = target.split(".")
            if target_parts[0] != package:
                continue
            target_area = areas.get(target_parts[1] if len(target_parts) > 1 else package)
            if target_area is None:
                violations.append(Violation(rel, line, f"imports {target}, which has no area"))
            elif target_area != area and target_area not in allowed[area]:
                violations.append(Violation(rel, line, f"{area} imports {target_area} ({target})"))
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                violations.append(Violation(rel, line, f"imports private {', '.join(private)} from {target}",
                                            "private"))
            unlisted = [n for n in names if exported.get(target) is not None and n not in exported[target]
                        and f"{target}.{n}" not in trees and not n.startswith("_")]
            if unlisted and target != module:
                violations.append(Violation(rel, line, f"imports {', '.join(unlisted)} from {target}, whose "
                                            "__all__ does not list it", "all"))
    return violations


@functools.lru_cache(maxsize=1)
def package_violations() -> tuple[Violation, ...]:
    return tuple(check_package(ROOT / "bvvit", ALLOWED, AREAS))


def test_the_package_keeps_its_import_rules():
    violations = [v for v in package_violations() if v.kind == "layer"]
    assert not violations, "\n".join(map(str, violations))


def test_no_module_takes_a_private_name_of_another():
    violations = [v for v in package_violations() if v.kind == "private"]
    assert not violations, "\n".join(map(str, violations))


def test_shared_names_are_listed_in_all():
    violations = [v for v in package_violations() if v.kind == "all"]
    assert not violations, "\n".join(map(str, violations))


def test_every_area_has_rules():
    assert set(AREAS.values()) == set(ALLOWED)


@pytest.mark.parametrize("source, expected", [
    ("from fake.evaluate.metrics import accuracy\n", "quant imports evaluate (fake.evaluate.metrics)"),
    ("def later():\n    import fake.train.loop\n", "quant imports train (fake.train.loop)"),
    ("from ..report import draw\n", "quant imports report (fake.report)"),
    ("from fake.quant.helpers import _private\n", "imports private _private from fake.quant.helpers"),
    ("from fake.quant.helpers import unlisted\n",
     "imports unlisted from fake.quant.helpers, whose __all__ does not list it"),
])
def test_a_planted_violation_is_reported(tmp_path, source, expected):
    package = tmp_path / "fake"
    for folder in ("quant", "evaluate", "train", "report"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "quant" / "helpers.py").write_text("_private = unlisted = listed = 1\n__all__ = ['listed']\n")
    (package / "quant" / "export.py").write_text(source)
    areas = {"fake": "fake", "quant": "quant", "evaluate": "evaluate", "train": "train", "report": "report"}
    allowed = {"fake": set(), "quant": {"fake"}, "evaluate": {"fake", "quant"}, "train": {"fake"},
               "report": {"fake"}}
    found = [str(v) for v in check_package(package, allowed, areas)]
    assert found == [f"fake/quant/export.py:{1 if 'later' not in source else 2}: {expected}"]


def test_a_module_without_an_area_is_reported(tmp_path):
    package = tmp_path / "fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "newthing.py").write_text("import os\n")
    found = [str(v) for v in check_package(package, {"fake": set()}, {"fake": "fake"})]
    assert found == ["fake/newthing.py:1: fake.newthing has no area in the import rules; add it"]
