"""The package is layered: every module imports only modules below it (function-level and ``TYPE_CHECKING``
imports included), so a margin can be followed from ``annotate_margins`` down without climbing back up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "legend_hf"

# Bottom to top. A module imports modules on lower floors and those listed before it on its own floor.
FLOORS: list[tuple[str, ...]] = [
    # 1: plain data and pure functions, the Hub transport
    ("names", "options", "formatting", "stats", "provenance", "precision", "packing", "hub"),
    # 2: shipped data, rendering from plain data, models, the direction artifact
    ("data_io", "plots", "cards", "batching", "models", "hidden_states", "reader", "direction"),
    # 3: the scoring path and its consumers
    ("labels", "scoring", "fitting", "recipes", "annotate", "evaluation", "report", "metric", "generate"),
    # 4: publishing and scaling out
    ("publish", "distributed", "ray_engine"),
    # 5: TRL on top of annotated data
    ("dpo", "training"),
    # 6: the command line (argument parsing and printing)
    ("cli.arguments", "cli.commands", "cli", "cli.__main__"),
]
ORDER = [name for floor in FLOORS for name in floor]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The legend_hf modules ``path`` imports anywhere in its body ("" for the package itself)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "legend_hf"]
            found |= {".".join(t.split(".")[1:]) for t in targets}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
            elif node.module and node.module.split(".")[0] == "legend_hf":
                base = node.module.split(".")[1:]
            else:
                continue
            stem = ".".join(p for p in base if p)
            for alias in node.names:  # `from . import x` imports the submodule x, if there is one
                sub = f"{stem}.{alias.name}" if stem else alias.name
                found.add(sub if is_module(sub) else stem)
    found.discard(name)
    return found


def test_every_module_has_a_floor():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {""}
    assert sorted(modules - set(ORDER)) == [], "add new modules to FLOORS"
    assert sorted(set(ORDER) - modules) == []


def test_modules_import_only_modules_below_them():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if not name:  # legend_hf/__init__.py: the lazy top-level API over everything
            continue
        for target in sorted(imports(path)):
            if target not in ORDER or ORDER.index(target) >= ORDER.index(name):
                upward.append(f"{name} imports {target or 'legend_hf (the package)'}")
    assert upward == []


def test_the_check_sees_function_level_and_type_checking_imports():
    assert {"cards", "models", "names", "provenance"} <= imports(PACKAGE / "direction.py")
    assert imports(PACKAGE / "cli" / "__main__.py") == {"cli"}
    assert "publish" in imports(PACKAGE / "cli" / "commands.py")  # a function-level import
