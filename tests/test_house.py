"""The house rules of docs/architecture.md, read from the code's own imports (every import, function-level too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imageprompt_widgets"
#: Each folder's floor: a module imports only its own floor and the floors below it.
FLOORS = {
    "": 0,  # the ground: settings, presets, images, conditioning, encoding, faults, extras, _version
    "loading": 1,
    "methods": 2, "structure": 2,
    "engine": 3,
    "views": 4, "toy": 4,
    "batch": 5, "cli": 5, "widget": 5,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports (names relative to the package)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [part for part in package if part]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("imageprompt_widgets"):
                base = node.module.split(".")[1:]
            else:
                continue
            stem = ".".join(base)
            for alias in node.names:  # `from . import units` imports the module units, not its package
                module = f"{stem}.{alias.name}".strip(".")
                targets.add(module if module in MODULES else stem)
        elif isinstance(node, ast.Import):
            targets |= {alias.name.split(".", 1)[1] for alias in node.names
                        if alias.name.startswith("imageprompt_widgets.")}
    return {target for target in targets if target in MODULES and target != name}


def folder(name: str) -> str:
    head = name.split(".")[0]
    return head if head in FLOORS and (PACKAGE / head).is_dir() else ""


def test_every_folder_has_a_floor():
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert folders <= set(FLOORS), f"give {sorted(folders - set(FLOORS))} a floor in FLOORS and docs/architecture.md"


def test_no_import_runs_up_the_floors():
    upward = [f"{name} -> {target}" for name in MODULES if name for target in imports(name)
              if FLOORS[folder(target)] > FLOORS[folder(name)]]
    assert upward == []


def test_no_import_circles():
    graph = {name: imports(name) - {""} for name in MODULES if name}
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


@pytest.mark.parametrize(("who", "never", "rule"), [
    ("engine.results", "views", "results never import views"),
    ("views", "loading", "views load no models"),
    ("widget", "loading", "a face asks the controller, never loading"),
])
def test_the_three_rules(who, never, rule):
    broken = [f"{name} -> {target}" for name in MODULES if name == who or name.startswith(who + ".")
              for target in imports(name) if target == never or target.startswith(never + ".")]
    assert broken == [], rule


def test_the_ground_stays_small_and_shadows_nothing():
    assert len(list(PACKAGE.glob("*.py"))) <= 10
    assert [name for name in MODULES if name.rsplit(".", 1)[-1] in sys.stdlib_module_names] == []
