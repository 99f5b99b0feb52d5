"""The module map of ARCHITECTURE.md holds: no import cycles, LMDB only in the
storage package, and a client that is not a node (neither LMDB nor the manager)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "blocknode"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules imported when `name` is imported (module level, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                out.add(base)
                for a in node.names:
                    if f"{base}.{a.name}" in known:
                        out.add(f"{base}.{a.name}")

    visit(tree.body)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _top_level_imports(p, m, known) for m, p in mods.items()}


def test_no_import_cycles() -> None:
    full = _graph()
    graph = {m: {d for d in deps if d in full} for m, deps in full.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of jobs.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not (m and d.startswith(m + "."))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_storage_package_imports_lmdb() -> None:
    offenders = sorted(m for m, deps in _graph().items()
                       if "lmdb" in deps and not m.startswith("blocknode.storage"))
    assert not offenders, offenders


def test_the_client_is_not_a_node() -> None:
    code = ("import sys, blocknode, blocknode.client, blocknode.cli; "
            "bad = [m for m in sys.modules if m == 'lmdb' or m == 'blocknode.manager' "
            "or m.startswith('blocknode.storage') or m == 'blocknode.node']; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def _modules_in_architecture_md() -> set[str]:
    """The file paths (relative to blocknode/) of the module tree in ARCHITECTURE.md."""
    import re

    text = (PKG.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tree = text.split("```", 2)[1]
    out: set[str] = set()
    dirs: list[str] = []
    for line in tree.splitlines():
        m = re.match(r"^(?P<indent>[│ ]*)[├└]── (?P<name>[\w./]+)", line)
        if not m:
            continue
        depth = len(m["indent"]) // 4
        del dirs[depth:]
        name = m["name"]
        if name.endswith("/"):
            dirs.append(name.rstrip("/"))
        else:
            out.add("/".join([*dirs, name]))
    return out


def test_architecture_md_lists_every_module_and_no_other() -> None:
    listed = _modules_in_architecture_md()
    on_disk = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")} | {
        str(p.relative_to(PKG)) for p in PKG.rglob("*.pyx")}
    assert sorted(on_disk - listed) == [], "modules missing from ARCHITECTURE.md"
    assert sorted(listed - on_disk) == [], "ARCHITECTURE.md lists modules that do not exist"
