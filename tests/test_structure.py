"""The shape of the code: one state interface both backends implement alike, no import cycle,
no module reaching into another's private names, inner modules never importing the CLI."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from archiver.state import PgState, State, StateDB

ROOT = Path(__file__).resolve().parent.parent / "archiver"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``path``, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*parts, *([node.module] if node.module else [])])
            names = [a.name for a in node.names]
            found.append((target, names))
            found += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in mods]
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(t, n) for t, n in found if t in mods and t != name]


def test_no_import_cycle_anywhere_in_the_package():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods)} for m, p in mods.items()}
    cycles: list[list[str]] = []
    seen: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        seen[module] = 1
        stack.append(module)
        for nxt in sorted(graph[module]):
            if seen.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif not seen.get(nxt):
                visit(nxt, stack)
        stack.pop()
        seen[module] = 2

    for module in sorted(graph):
        if not seen.get(module):
            visit(module, [])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_no_module_imports_another_modules_private_names_and_none_imports_the_cli():
    mods = _modules()
    private, cli = [], []
    for name, path in mods.items():
        for target, names in _imports(name, path, mods):
            private += [f"{name}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
            if target == "archiver.cli" and name != "archiver.__main__":
                cli.append(name)
    assert not private and not cli, (private, cli)


def _interface() -> dict[str, inspect.Signature]:
    members = {}
    for name, value in vars(State).items():
        if name.startswith("_") or (not callable(value) and not isinstance(value, property)):
            continue
        members[name] = inspect.signature(value.fget if isinstance(value, property) else value)
    return members


def test_both_backends_implement_the_one_state_interface_with_the_same_signatures():
    interface = _interface()
    assert {"due", "mark_archived", "mark_server_deleted", "audited", "pace", "writer_tag"} <= set(interface)
    for backend in (StateDB, PgState):
        for name, wanted in interface.items():
            member = inspect.getattr_static(backend, name, None)
            assert member is not None, f"{backend.__name__} lacks {name}"
            if isinstance(member, property):
                member = member.fget
            got = inspect.signature(member)
            assert list(got.parameters) == list(wanted.parameters), f"{backend.__name__}.{name}{got} vs {wanted}"
            for param in wanted.parameters.values():
                assert got.parameters[param.name].default == param.default, f"{backend.__name__}.{name}"


README = ROOT.parent / "README.md"
INSTALL_AND_RUN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/voipbin-archiver demo"
INSTALL_AND_TEST = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/ruff check . && .venv/bin/pytest"
)


def test_the_readme_is_a_front_door_whose_links_all_lead_somewhere():
    import re

    text = README.read_text()
    assert len(text) <= 20_000, f"README.md is {len(text)} characters: the details belong in docs/"
    assert INSTALL_AND_RUN in text and INSTALL_AND_TEST in text, "the README's two commands"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (README.parent / target).exists(), f"README.md links to {target}, which does not exist"
