"""The layer table at the top of docs/architecture.md matches the imports of the code.

The table lists, per layer (top to bottom), the modules of ``cloudckpt/`` and the backend
plugins (a package entry may list its modules in parentheses: then the list is complete and
exact); a line under it names the leaves every layer may import. Read with ``ast``: every
``import`` of a cloudckpt module, at module level or inside a function (but not under
``if TYPE_CHECKING:``), goes to the same layer, a layer below, or a leaf; leaves import only
leaves; the core never imports a plugin; backends never import torch (DESIGN.md: backends know
nothing of tensors).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PLUGINS = {"backends/s3": "cloudckpt_s3", "backends/gcs": "cloudckpt_gcs"}
LEAF_LINE = "leaves every layer may import"
BACKEND_LAYER = "backend"


@dataclass(frozen=True)
class Module:
    """A module of the library or a plugin: dotted name, file, and whether it is a package."""

    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module name, and where it is written."""

    target: str
    line: int
    torch: bool  # an import of torch (target is then "torch")
    lazy: bool  # inside a function


@dataclass(frozen=True)
class Table:
    """The layer rows in order (top first), each with its module names, and the leaves."""

    rows: list[tuple[str, list[str]]]
    leaves: list[str]
    contents: dict[str, list[str]]  # a package entry's parenthesized list of its modules


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    trees = [(ROOT / "cloudckpt", "cloudckpt")]
    trees += [(ROOT / folder / pkg, pkg) for folder, pkg in PLUGINS.items()]
    for base, pkg in trees:
        for path in sorted(base.rglob("*.py")):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def _token_modules(token: str, modules: dict[str, Module]) -> list[str]:
    """The modules a table entry names: ``x.py``, ``pkg/`` (all of it), ``pkg/x.py``,
    ``__init__.py`` (the package itself), ``backends/s3`` (a plugin, all of it)."""
    token = token.strip()
    if token.rstrip("/") in PLUGINS:
        pkg = PLUGINS[token.rstrip("/")]
        return [m for m in modules if m == pkg or m.startswith(pkg + ".")]
    if token.endswith("/"):
        pkg = "cloudckpt." + token.strip("/").replace("/", ".")
        return [m for m in modules if m == pkg or m.startswith(pkg + ".")]
    if token.endswith(".py"):
        parts = token[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(["cloudckpt", *parts])
        return [name] if name in modules else []
    return []


def _table(modules: dict[str, Module]) -> Table:
    text = ARCHITECTURE.read_text()
    rows: list[tuple[str, list[str]]] = []
    leaves: list[str] = []
    contents: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("## "):
            break
        for package, listed in re.findall(r"`([^`]+/)`\s*\(([^)]*)\)", line):
            contents[package] = re.findall(r"`([^`]+\.py)`", listed)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("layer", "---"):
            tokens = re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cells[1]))
            rows.append((cells[0], tokens))
        elif LEAF_LINE in line.lower():
            leaves = re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", line))
    assert rows, f"{ARCHITECTURE}: no layer table before the first '## ' heading"
    assert leaves, f"{ARCHITECTURE}: no line saying which modules are '{LEAF_LINE}'"
    return Table(rows, leaves, contents)


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _imports(module: Module, modules: dict[str, Module]) -> list[Import]:
    tree = ast.parse(module.path.read_text(), str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(base: str, names: list[str]) -> list[str]:
        # `from pkg import sub` imports the submodule pkg.sub where there is one
        subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
        return subs if subs and len(subs) == len(names) else [base, *subs]

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "torch":
                    found.append(Import("torch", node.lineno, True, lazy))
                elif top == "cloudckpt" or top in PLUGINS.values():
                    found.append(Import(alias.name, node.lineno, False, lazy))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module or ""
            top = base.split(".")[0]
            names = [a.name for a in node.names]
            if top == "torch":
                found.append(Import("torch", node.lineno, True, lazy))
            elif top == "cloudckpt" or top in PLUGINS.values():
                for target in resolve(base, names):
                    found.append(Import(target, node.lineno, False, lazy))
        lazy_inside = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy_inside)

    visit(tree, False)
    return found


MODULES = _modules()
TABLE = _table(MODULES)


def _placement() -> tuple[dict[str, int], set[str], list[str]]:
    """Row index of every module, the leaves, and what is wrong with the table itself."""
    problems: list[str] = []
    row_of: dict[str, list[int]] = {}
    for i, (layer, tokens) in enumerate(TABLE.rows):
        for token in tokens:
            names = _token_modules(token, MODULES)
            if not names:
                problems.append(f"layer {layer!r} lists `{token}`, which is no module")
            for name in names:
                row_of.setdefault(name, []).append(i)
    leaves: set[str] = set()
    for token in TABLE.leaves:
        names = _token_modules(token, MODULES)
        if not names:
            problems.append(f"the leaves line lists `{token}`, which is no module")
        leaves.update(names)
    for package, listed in TABLE.contents.items():
        base = "cloudckpt." + package.strip("/").replace("/", ".")
        present = {m.rpartition(".")[2] + ".py" for m in MODULES if m.rpartition(".")[0] == base}
        present -= {"__init__.py"}
        for name in sorted(set(listed) - present):
            problems.append(f"`{package}` lists `{name}`, which is not in it")
        for name in sorted(present - set(listed)):
            problems.append(f"`{package}` does not list its module `{name}`")
    placed: dict[str, int] = {}
    for name in MODULES:
        rows = sorted(set(row_of.get(name, [])))
        if name in leaves and rows:
            problems.append(f"{name} is a leaf and also in layer {TABLE.rows[rows[0]][0]!r}")
        elif len(rows) > 1:
            problems.append(f"{name} is in layers {[TABLE.rows[r][0] for r in rows]}")
        elif not rows and name not in leaves:
            problems.append(f"{name} is in no layer and not a leaf")
        elif rows:
            placed[name] = rows[0]
    return placed, leaves, problems


def _owner(target: str, known: set[str]) -> str | None:
    """The module an import names: itself, or the longest module prefix (``pkg.attr``)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def test_every_module_is_in_exactly_one_layer_or_a_leaf() -> None:
    _, _, problems = _placement()
    assert not problems, f"{ARCHITECTURE.name} layer table:\n" + "\n".join(problems)


def test_imports_point_down_or_to_a_leaf() -> None:
    placed, leaves, _ = _placement()
    known = set(MODULES)
    bad: list[str] = []

    def where(name: str) -> str:
        return "leaf" if name in leaves else f"layer {TABLE.rows[placed[name]][0]!r}"

    for name, module in sorted(MODULES.items()):
        if name not in placed and name not in leaves:
            continue  # reported by the test above
        for imp in _imports(module, MODULES):
            if imp.torch:
                continue
            target = _owner(imp.target, known)
            if target is None or target == name:
                continue
            if target not in placed and target not in leaves:
                continue
            if name in leaves:
                ok = target in leaves
            else:
                ok = target in leaves or placed[target] >= placed[name]
            if not ok:
                bad.append(
                    f"{module.path.relative_to(ROOT)}:{imp.line}: {name} ({where(name)}) "
                    f"imports {target} ({where(target)})"
                )
    assert not bad, "imports pointing up the layer table:\n" + "\n".join(bad)


def test_the_core_never_imports_a_plugin() -> None:
    bad = [
        f"{m.path.relative_to(ROOT)}:{imp.line}: {name} imports {imp.target}"
        for name, m in sorted(MODULES.items())
        if name.split(".")[0] == "cloudckpt"
        for imp in _imports(m, MODULES)
        if imp.target.split(".")[0] in PLUGINS.values()
    ]
    assert not bad, "the core imports a backend plugin:\n" + "\n".join(bad)


def test_backends_never_import_torch() -> None:
    placed, _, _ = _placement()
    layer_names = [layer for layer, _ in TABLE.rows]
    assert BACKEND_LAYER in layer_names, f"{ARCHITECTURE.name}: no layer named {BACKEND_LAYER!r}"
    backend_row = layer_names.index(BACKEND_LAYER)
    bad = [
        f"{m.path.relative_to(ROOT)}:{imp.line}: {name} (layer {BACKEND_LAYER!r}) imports torch"
        for name, m in sorted(MODULES.items())
        if placed.get(name) == backend_row
        for imp in _imports(m, MODULES)
        if imp.torch
    ]
    assert not bad, "backends know nothing of tensors:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .a import b\n", ["cloudckpt.protocol.a"]),
        ("def f():\n    from ..storage import x\n", ["cloudckpt.storage"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import b\n", []),
        ("import torch\n", ["torch"]),
    ],
)
def test_the_import_reader_sees_lazy_imports_and_skips_type_checking(
    tmp_path: Path, source: str, expected: list[str]
) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    module = Module("cloudckpt.protocol.m", path, False)
    found = [i.target for i in _imports(module, {})]
    assert found == expected
