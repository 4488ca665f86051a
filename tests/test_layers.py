"""The layers of ``src/fable`` (docs/architecture.md): imports only point down.

Every ``import`` in every module counts, those inside functions included; imports under
``if TYPE_CHECKING:`` do not (they exist for annotations only). The test fails on an import
cycle between modules, on an import of a module from a higher layer, and on a private name
(``_x``) imported from another fable module (the C extensions ``_core`` and ``_native`` and the
codec ``_wire`` are private modules meant to be imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fable

SRC = Path(fable.__file__).parent

# Lowest first. A module may import modules of its own layer or of a lower one. A package name
# stands for every module in it, unless a module is named on its own.
LAYERS: list[tuple[str, ...]] = [
    ("fable.version", "fable.errors", "fable.config", "fable.topology", "fable._wire"),
    ("fable.buffer", "fable.ring", "fable._core"),
    ("fable.transports",),
    ("fable.handshake", "fable.epochs", "fable.readiness", "fable.aio", "fable.control"),
    ("fable.connection",),
    ("fable.poll", "fable.testing"),
    ("fable.nameservice", "fable.client"),
    ("fable.endpoint", "fable.run"),
    ("fable.xio", "fable"),
    ("fable.policy",),
    ("fable.daemon",),
    ("fable.bench", "fable.testing.cluster"),
    ("fable.doctor", "fable.cli"),
]
PRIVATE_MODULES_OK = {"fable._core", "fable._wire", "fable.bench._native"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
NATIVE = {"fable._core", "fable.bench._native"}
KNOWN = set(MODULES) | NATIVE


def layer_of(mod: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    if rank < 0:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS and docs/architecture.md")
    return rank


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = (
                t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            )
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_in(source: str, mod: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every fable import in ``source``, the
    text of module ``mod``; those under ``if TYPE_CHECKING:`` left out."""
    tree = ast.parse(source)
    skip = _type_checking_blocks(tree)
    pkg = mod if is_package else mod.rpartition(".")[0]
    out: list[tuple[str, str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fable" or a.name.startswith("fable."):
                    out.append((a.name, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not (target == "fable" or target.startswith("fable.")):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in KNOWN:  # `from fable import connection`: the module itself
                    out.append((sub, "", node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def imports_of(mod: str) -> list[tuple[str, str, int]]:
    path = MODULES[mod]
    return imports_in(path.read_text(), mod, path.name == "__init__.py")


def upward(mod: str, imports: list[tuple[str, str, int]]) -> list[str]:
    """The imports of ``mod`` against the layer order."""
    return [
        f"{mod}:{line} imports {target}"
        for target, _, line in imports
        if target in KNOWN and layer_of(target) > layer_of(mod)
    ]


def private(mod: str, imports: list[tuple[str, str, int]]) -> list[str]:
    """The private names (or private modules) ``mod`` imports from other fable modules."""
    bad = []
    for target, name, line in imports:
        if target != mod and target not in PRIVATE_MODULES_OK:
            priv_mod = any(p.startswith("_") for p in target.split(".")[1:])
            if (name.startswith("_") and not name.startswith("__")) or priv_mod:
                bad.append(f"{mod}:{line} imports {f'{target}.{name}' if name else target}")
    return bad


def edges() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports_of(m):
            if target != m and target in MODULES:
                g[m].add(target)
    return g


def test_every_module_is_in_a_layer() -> None:
    for m in MODULES:
        layer_of(m)


def test_no_import_points_up() -> None:
    bad = [b for m in MODULES for b in upward(m, imports_of(m))]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``g`` meets (each as a path that returns to its start)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle() -> None:
    cycles = find_cycles(edges())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_name_crosses_modules() -> None:
    bad = [b for m in MODULES for b in private(m, imports_of(m))]
    assert not bad, "private names imported from other modules:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_name() -> None:
    """A module that imports up (in a function too), and a private name, is caught; an import
    under TYPE_CHECKING is not counted (so each check above can fail)."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from fable.cli import main\n"
        "from fable.transports.message import _private\n"
        "from fable.errors import FableError\n"
        "if TYPE_CHECKING:\n"
        "    from fable.daemon import server\n"
        "def f():\n"
        "    import fable.policy\n"
    )
    found = imports_in(src, "fable.transports.fake")
    assert sorted(t for t, _, _ in found) == [
        "fable.cli",
        "fable.errors",
        "fable.policy",
        "fable.transports.message",
    ]
    ups = upward("fable.transports.fake", found)
    assert any("fable.cli" in u for u in ups) and any("fable.policy" in u for u in ups)
    assert not any("fable.errors" in u for u in ups)
    privs = private("fable.transports.fake", found)
    assert privs == ["fable.transports.fake:3 imports fable.transports.message._private"]
