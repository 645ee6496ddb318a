"""The layout's contracts, checked on the source (ast): one-way data flow between xtok's packages, no
module reaching into another's private names, every imported third-party package declared in
pyproject.toml, and the public API (`from xtok import align` is the function)."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("xtok", "projection_tools", "benchmarks", "examples", "tests")
# xtok's packages in data-flow order: each may import only those before it (docs/architecture.md)
ORDER = ["tokens", "chat", "rows", "alignment", "projection", "store", "extract", "collate", "losses", "evaluation",
         "onpolicy", "trainer", "testing", "cli"]


def _files(*dirs):
    for d in dirs:
        yield from sorted((REPO / d).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    """The absolute module an ImportFrom refers to."""
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    """(absolute module, imported name or None, line) for every import in the file."""
    mod = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node, path.name == "__init__.py")
            for a in node.names:
                yield target, a.name, node.lineno


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_private_names():
    """`from M import _x` across modules, or `M._x` on an imported module, is a reach into another
    module's internals: every name used across modules is public."""
    bad = []
    for f in _files(*CODE_DIRS):
        src = f.read_text(encoding="utf-8")
        tree = ast.parse(src)
        modules = set()
        for target, name, line in _imports(f):
            if name is not None and _is_private(name) and target.split(".")[0] in ("xtok", "projection_tools",
                                                                                      "benchmarks"):
                bad.append(f"{f.relative_to(REPO)}:{line}: from {target} import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update((a.asname or a.name).split(".")[0] for a in node.names
                               if a.name.split(".")[0] in ("xtok", "projection_tools"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("xtok", "projection_tools"):
                modules.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in modules):
                bad.append(f"{f.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_data_flows_one_way():
    """An xtok package imports only packages before it in ORDER (and never projection_tools, except the
    build-projection command); projection_tools uses only xtok's public packages."""
    bad = []
    for f in _files("xtok"):
        parts = _module_name(f).split(".")
        if len(parts) < 2:
            continue
        here = parts[1]
        assert here in ORDER, f"{f}: package {here!r} is not in the data-flow order of this test"
        for target, _name, line in _imports(f):
            t = target.split(".")
            if t[0] == "projection_tools" and _module_name(f) != "xtok.cli.projection":
                bad.append(f"{f.relative_to(REPO)}:{line}: imports {target}")
            if t[0] != "xtok" or len(t) < 2 or t[1] == here:
                continue
            if t[1] in ORDER and ORDER.index(t[1]) > ORDER.index(here):
                bad.append(f"{f.relative_to(REPO)}:{line}: {here} imports {target} (later in the flow)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    """The module graph (every import, also inside functions) of xtok and projection_tools is acyclic."""
    graph: dict[str, set[str]] = {}
    files = list(_files("xtok", "projection_tools"))
    names = {_module_name(f) for f in files}
    for f in files:
        mod = _module_name(f)
        deps = set()
        for target, name, _ in _imports(f):
            for cand in (f"{target}.{name}" if name else None, target):
                if cand in names and cand != mod:
                    deps.add(cand)
                    break
        graph[mod] = {d for d in deps if not mod.startswith(d + ".")}  # a package's own __init__ is no edge
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [n, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if state.get(n) is None and visit(n, [n]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _declared() -> set[str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        data = tomllib.loads(text)
    else:  # pragma: no cover
        pytest.skip("needs tomllib (Python >= 3.11)")
    reqs = list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def test_pyproject_declares_every_third_party_import():
    """Every top-level package imported by xtok/ or projection_tools/ is the standard library, ours, or
    provided by a distribution listed in pyproject.toml (dependencies or an extra)."""
    declared = _declared()
    dists = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for f in _files("xtok", "projection_tools"):
        for target, _name, line in _imports(f):
            top = target.split(".")[0]
            if not top or top in stdlib or top in ("xtok", "projection_tools"):
                continue
            provided = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            if not provided & declared:
                missing.setdefault(top, f"{f.relative_to(REPO)}:{line}")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_declared_dependencies_are_used():
    """No dependency in [project.dependencies] is unused by xtok/ and projection_tools/ (scipy included)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    import tomllib

    deps = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-")
            for r in tomllib.loads(text)["project"]["dependencies"]}
    dists = md.packages_distributions()
    used = set()
    for f in _files("xtok", "projection_tools"):
        for target, _name, _ in _imports(f):
            top = target.split(".")[0]
            used |= {d.lower().replace("_", "-") for d in dists.get(top, [top])}
    # needed without being imported by name: protobuf (sentencepiece / transformers' tokenizer conversion)
    # and mistral-common (a data package: its built-in tokenizer files, found with importlib.util.find_spec)
    unused = deps - used - {"protobuf", "mistral-common"}
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_public_align_is_the_function():
    import xtok
    from xtok import align

    assert callable(align) and align.__name__ == "align" and not isinstance(align, type(xtok))
    import xtok.alignment  # noqa: F401 - importing the package must not shadow the function
    from xtok import align as again

    assert again is align


def test_package_exports_resolve():
    """Every name in xtok.__all__ resolves (lazily) to an object of that name."""
    import xtok

    for name in xtok.__all__:
        obj = getattr(xtok, name)
        assert getattr(obj, "__name__", name) == name, name
