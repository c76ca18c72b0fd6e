"""The layering of DESIGN.md, checked on the import graph (docs/architecture.md, "Layers").

kernel (``imgpipe/*.py``) <- ``db`` <- ``orchestrator`` | ``workers`` <- face (``imgpipe/face``).
``orchestrator`` and ``workers`` never import each other; torch and torchvision are imported
only under ``workers/``. Every import counts, including those inside functions and under
``TYPE_CHECKING``: the graph is read from each module's syntax tree, nothing is executed.
A subprocess then imports the light entry points and checks that torch stayed out of
``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("imgpipe", "db", "orchestrator", "workers")
TORCH_PACKAGES = frozenset({"torch", "torchvision"})

# What each layer may import, first-party. A layer always may import itself.
ALLOWED: dict[str, frozenset[str]] = {
    "kernel": frozenset(),
    "db": frozenset({"kernel"}),
    "orchestrator": frozenset({"kernel", "db"}),
    "workers": frozenset({"kernel", "db"}),
    "face": frozenset({"kernel", "db", "orchestrator", "workers"}),
}

# Modules whose import must not load torch (the CLI start-up, the control worker, ingest).
TORCH_FREE_ENTRY_POINTS = (
    "imgpipe",
    "imgpipe.face.cli",
    "orchestrator.tasks",
    "orchestrator.ingest",
    "orchestrator.submit",
    "orchestrator.backfill",
    "orchestrator.pipelines",
)


@dataclass(frozen=True)
class Import:
    importer: str
    """Dotted name of the importing module."""
    imported: str
    """Dotted name of what it imports (a module, or a name inside one)."""
    line: int


# The package's front door belongs to the face: ``imgpipe/__init__.py`` re-exports the
# Python API (loaded on first use) and ``python -m imgpipe`` runs the CLI.
FACE_DOORS = frozenset({"imgpipe", "imgpipe.__main__"})


def layer_of(module: str) -> str | None:
    """The layer of a first-party dotted name; None for third-party and the stdlib."""
    top = module.split(".")[0]
    if module in FACE_DOORS:
        return "face"
    if top == "imgpipe":
        in_face = module == "imgpipe.face" or module.startswith("imgpipe.face.")
        return "face" if in_face else "kernel"
    return top if top in PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def imports_of(path: Path) -> Iterator[Import]:
    """Every import statement in the file, at any depth (functions, ``if`` blocks ...)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            for alias in node.names:
                yield Import(name, f"{base}.{alias.name}" if base else alias.name, node.lineno)


def all_imports() -> list[Import]:
    return [imp for path in source_files() for imp in imports_of(path)]


def test_the_graph_is_read() -> None:
    """Guards the checks below against passing on an empty graph."""
    imports = all_imports()
    importers = {imp.importer for imp in imports}
    assert {"imgpipe.face.cli", "db.dag", "orchestrator.submit", "workers.execute"} <= importers
    assert any(imp.imported.startswith("torch") for imp in imports)
    # imports inside functions are seen (the face imports orchestrator lazily)
    assert any(
        imp.importer.startswith("imgpipe.face") and layer_of(imp.imported) == "orchestrator"
        for imp in imports
    )


def test_layers_import_only_below_them() -> None:
    violations = []
    for imp in all_imports():
        source, target = layer_of(imp.importer), layer_of(imp.imported)
        if source is None or target is None or source == target:
            continue
        if target not in ALLOWED[source]:
            violations.append(
                f"{imp.importer}:{imp.line} ({source}) imports {imp.imported} ({target})"
            )
    assert not violations, (
        "imports against the layering (kernel <- db <- orchestrator | workers <- face; "
        "move the code to the lowest layer both sides may import):\n" + "\n".join(violations)
    )


def test_torch_only_under_workers() -> None:
    violations = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in all_imports()
        if imp.imported.split(".")[0] in TORCH_PACKAGES and layer_of(imp.importer) != "workers"
    ]
    assert not violations, (
        "torch/torchvision imported outside workers/ (model code belongs in workers/; "
        "others reach it through task names and the database):\n" + "\n".join(violations)
    )


@pytest.mark.parametrize("module", TORCH_FREE_ENTRY_POINTS)
def test_entry_point_loads_no_torch(module: str) -> None:
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'torchvision'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr}"
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing {module} loads {loaded[:5]}: keep torch behind workers/"


def test_import_linter_kernel_contract_lists_every_kernel_module() -> None:
    """``lint-imports`` (make lint) checks the kernel by a list of modules in pyproject.toml;
    a kernel module missing from it would go unchecked there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (kernel,) = [c for c in config["contracts"] if c["id"] == "kernel"]
    expected = {module_name(path) for path in (ROOT / "imgpipe").glob("*.py")}
    assert set(kernel["source_modules"]) == expected, (
        "pyproject.toml [tool.importlinter] contract 'kernel': source_modules must list "
        "exactly the modules directly in imgpipe/"
    )
