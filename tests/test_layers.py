"""Imports go down only: the layers of the design card, and the shape of node/.

Every module of the five packages is parsed (no import is run) and each import
it makes, at module level or inside a function, is checked against the order:

    node  ->  bootstrap | capabilities  ->  runners  ->  protocols

``protocols`` (the wire and the shared primitives) imports no trio, no libp2p
and nothing of swarm's above it; ``bootstrap`` and ``capabilities`` do not
import each other. Inside ``node`` the sub-packages keep an order of their own
(``NODE_ORDER``, top first): a module may import its own group or any group
below it, never one above.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"node": 3, "bootstrap": 2, "capabilities": 2, "runners": 1, "protocols": 0}
# Top first. Groups on one line may import each other.
NODE_ORDER: list[set[str]] = [
    {"node.cli"},
    {"node.daemon"},
    {"node.status"},
    {"node.services"},
    {"node.config"},
    {"node.gateway", "node.mcp"},  # mcp is served on the gateway and uses its parts
    {"node.client"},
    {"node.models"},
    {"node.content"},  # shares and pulls model files; the daemon wires it
    {"node.jobs", "node.membership"},
    {"node.reach"},  # membership links through it; it reads the table through callables
    {"node.observe", "node.net"},
    {"node.errors", "node.json_values", "node.data_dir", "node.defaults"},
]
PURE_FORBIDDEN = ("trio", "libp2p", "anyio", "httpx")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(text: str, name: str, *, package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import in ``text``, the source of module
    ``name`` (a package's ``__init__`` when ``package``)."""
    tree = ast.parse(text, name)
    base_package = name if package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = base_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if node.module is None:  # from . import x: each x is a module
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, module


def _modules() -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def _node_group(module: str) -> int | None:
    for rank, group in enumerate(NODE_ORDER):
        if any(module == g or module.startswith(g + ".") for g in group):
            return rank
    return None


def test_every_node_module_has_a_place_in_the_order() -> None:
    missing = [
        _module_name(p)
        for p in (ROOT / "node").rglob("*.py")
        if p.name != "__init__.py" or p.parent != ROOT / "node"
        if _node_group(_module_name(p)) is None
    ]
    assert not missing, f"give these a place in NODE_ORDER: {missing}"


def _wrong(here: str, target: str) -> str | None:
    """Why module ``here`` may not import ``target``, or None when it may."""
    top, other = here.split(".")[0], target.split(".")[0]
    if other in LAYERS:
        if LAYERS[other] > LAYERS[top]:
            return "up a layer"
        if LAYERS[other] == LAYERS[top] and other != top:
            return "a sibling layer"
    if top == "protocols" and other in PURE_FORBIDDEN:
        return "protocols is pure"
    if top == other == "node" and here != "node":
        mine, theirs = _node_group(here), _node_group(target)
        if mine is not None and theirs is not None and theirs < mine:
            return "up inside node/"
    return None


def test_imports_go_down_only() -> None:
    wrong = []
    for path in _modules():
        here = _module_name(path)
        for line, target in _imports(path.read_text(), here, package=path.name == "__init__.py"):
            why = _wrong(here, target)
            if why:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({why})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "bad"),
    [
        ("protocols.codec", "import trio\n"),
        ("protocols.codec", "from runners.base import Runner\n"),
        ("runners.fake", "from node.errors import NodeError\n"),
        ("bootstrap.dht", "from capabilities.record import record_body\n"),
        ("node.jobs.service", "from node.gateway.app import Backend\n"),
        ("node.jobs.service", "def f():\n    from ..daemon import Node\n"),
    ],
)
def test_the_check_finds_an_import_up(module: str, bad: str) -> None:
    """The checker itself: each of these imports, inside a function too, is refused."""
    found = [_wrong(module, target) for _, target in _imports(bad, module)]
    assert found and all(found), f"{bad!r} in {module} passed the check"
