"""The package layering, checked on the source: imports only point down, and nothing goes in a circle.

    protocol                      the contract: what every participant must agree on
    gauntlet  transport           pure scoring | I/O clients (buckets, chain, shard fetching)
    neurons                       node roles, CLI, dataset building
    devnet                        the local network
    bench                         benchmarks (may import anything)

A package may import itself and the packages below it: gauntlet and transport import protocol only
(not each other), neurons imports gauntlet/transport/protocol, devnet also neurons, bench anything;
tests/ are not checked. Every `.py` file of these packages is parsed with `ast`, and every import
statement counts wherever it stands (module level, inside a function, under `if TYPE_CHECKING:`),
as does `importlib.import_module("...")` with a literal name: a lazy or type-only import still
makes the lower layer unreadable without the upper one.

`protocol/` is the contract every participant must agree on, so besides the layering it must stay
free of I/O clients and process machinery: no boto3, botocore, aiohttp, argparse, threading,
concurrent(.futures) or asyncio, and no bittensor module except `bittensor.sp_core` (the sr25519
signature primitives with which `wire.py` and `peers.py` sign and verify shards and peer lists;
chain access lives in `transport/chain.py`).

Each package's `__init__.py` docstring is its map (hivemind's `dht/__init__.py` style): it must
name every module file of the package, so a new module cannot land without a line saying what it is.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "transport", "gauntlet", "neurons", "devnet", "bench")
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "gauntlet": {"gauntlet", "protocol"},
    "transport": {"transport", "protocol"},
    "neurons": {"neurons", "transport", "gauntlet", "protocol"},
    "devnet": {"devnet", "neurons", "transport", "gauntlet", "protocol"},
    "bench": set(PACKAGES),
}
PROTOCOL_FORBIDDEN = ("boto3", "botocore", "aiohttp", "argparse", "threading", "concurrent", "asyncio")
PROTOCOL_BITTENSOR_ALLOWED = "bittensor.sp_core"


@dataclass(frozen=True)
class Import:
    """One imported module name, where it was imported, and the statement that did it."""

    module: str  # the importing module, e.g. "protocol.wire"
    path: Path
    line: int
    target: str  # absolute dotted name, e.g. "bittensor.sp_core" or "protocol.codec"
    statement: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: `{self.statement}`"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(source: str, path: Path, module: str) -> list[Import]:
    """Every module or name `source` imports, at any depth of the syntax tree.

    `from a.b import c` yields `a.b.c` (c may be a submodule or an attribute; `import_graph` maps it to
    the longest prefix that is a module); `importlib.import_module("x")` with a literal counts as `import x`.
    """
    tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            if base == "__future__":
                continue
            names = [alias.name for alias in node.names if alias.name != "*"]
            targets = [f"{base}.{name}" if base else name for name in names] or [base]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for target in targets:
            if target:
                found.append(Import(module, path, node.lineno, target, ast.unparse(node)))
    return found


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def all_imports() -> list[Import]:
    return [imp for path in source_files() for imp in imports_of(path.read_text(), path, module_name(path))]


def project_modules() -> set[str]:
    return {module_name(p) for p in source_files()}


def package_of(name: str) -> str:
    return name.split(".")[0]


def _is_under(target: str, top: str) -> bool:
    return target == top or target.startswith(top + ".")


# --- the rules ---------------------------------------------------------------------------------


def protocol_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if package_of(imp.module) != "protocol":
            continue
        if any(_is_under(imp.target, name) for name in PROTOCOL_FORBIDDEN):
            bad.append(f"{imp.where()}: protocol/ must not use {imp.target} (I/O or process machinery)")
        elif _is_under(imp.target, "bittensor") and not _is_under(imp.target, PROTOCOL_BITTENSOR_ALLOWED):
            bad.append(f"{imp.where()}: protocol/ may use only {PROTOCOL_BITTENSOR_ALLOWED} of bittensor, "
                       f"not {imp.target}")
        elif package_of(imp.target) in PACKAGES and package_of(imp.target) != "protocol":
            bad.append(f"{imp.where()}: protocol/ must not import {package_of(imp.target)}/")
    return bad


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        source, target = package_of(imp.module), package_of(imp.target)
        if target in PACKAGES and target not in ALLOWED[source]:
            bad.append(f"{imp.where()}: {source}/ must not import {target}/ "
                       f"({source} may import {', '.join(sorted(ALLOWED[source]))})")
    return bad


def import_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """Module → {imported project module → the first statement importing it}."""
    modules = project_modules()
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        target = imp.target
        while target not in modules and "." in target:  # `protocol.wire.Shard` -> `protocol.wire`
            target = target.rsplit(".", 1)[0]
        if target in modules and target != imp.module:
            graph[imp.module].setdefault(target, imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def cycle_in(component: list[str], graph: dict[str, dict[str, Import]]) -> list[tuple[str, str, Import]]:
    """One concrete cycle inside a strongly connected component: (importer, imported, statement) edges."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first from start until an edge returns to start: a shortest cycle
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    nodes = path[::-1] + [start]
                    return [(a, b, graph[a][b]) for a, b in zip(nodes, nodes[1:], strict=False)]
                if child not in came_from and child != start:
                    came_from[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def cycle_reports(imports: list[Import]) -> list[str]:
    graph = import_graph(imports)
    reports = []
    for component in strongly_connected(graph):
        edges = cycle_in(component, graph)
        chain = " -> ".join([edges[0][0]] + [b for _, b, _ in edges])
        reports.append(f"import cycle {chain}:\n" + "\n".join(f"    {e.where()}" for _, _, e in edges))
    return reports


def package_map_gaps() -> list[str]:
    gaps = []
    for pkg in PACKAGES:
        for init in sorted((ROOT / pkg).rglob("__init__.py")):
            folder = init.parent
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            where = init.relative_to(ROOT)
            if not doc:
                gaps.append(f"{where}:1: no docstring (the package map: one line per module)")
                continue
            names = [p.name for p in folder.glob("*.py") if p.name != "__init__.py"]
            names += [f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").is_file()]
            for name in sorted(names):
                if not re.search(rf"(?<![\w./]){re.escape(name)}", doc):
                    gaps.append(f"{where}:1: docstring does not name {name}")
    return gaps


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


def test_every_layer_package_is_parsed(imports):
    files = source_files()
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg}/ is not a package"
        assert any(p.parent.name == pkg and p.name != "__init__.py" for p in files), f"no modules in {pkg}/"
    assert any(imp.target.startswith("protocol.hparams.") for imp in imports)  # the parser sees real imports


def test_protocol_is_the_contract_only(imports):
    bad = protocol_violations(imports)
    assert not bad, "protocol/ imports what the contract must not need:\n" + "\n".join(bad)


def test_imports_only_point_down_the_layers(imports):
    bad = layer_violations(imports)
    assert not bad, "upward or sideways imports between layers:\n" + "\n".join(bad)


def test_no_import_cycles(imports):
    reports = cycle_reports(imports)
    assert not reports, "\n".join(reports)


def test_every_package_map_names_every_module():
    gaps = package_map_gaps()
    assert not gaps, "package maps (__init__.py docstrings) are incomplete:\n" + "\n".join(gaps)


def test_protocol_doc_citations_resolve():
    """`docs/protocol.md §N` citations name a section that exists; none cite the out-of-repo DESIGN.md."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    sections = set(re.findall(r'^<a id="s(\d+)"></a>\n## §\1 ', doc, flags=re.MULTILINE))
    assert {"3", "5", "6", "7", "8"} <= sections, sorted(sections)
    bad = []
    for path in [*source_files(), ROOT / "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            bad += [f"{where}: §{n} is not a section of docs/protocol.md"
                    for n in re.findall(r"docs/protocol\.md`?\s*§(\d+)", line) if n not in sections]
            if re.search(r"DESIGN(\.md| §)", line):
                bad.append(f"{where}: cites DESIGN, which a clone does not have; cite docs/protocol.md")
    assert not bad, "\n".join(bad)


# --- the checker itself: each rule catches what it is for --------------------------------------------

_PROBE = '''
"""A module that breaks every rule."""
from typing import TYPE_CHECKING
import concurrent.futures
from bittensor.sp_core import Keypair
from . import wire
if TYPE_CHECKING:
    from transport.bucket import Bucket

def lazy():
    import bittensor as bt
    from ..neurons import node
    importlib.import_module("boto3.session")
'''


def test_checker_sees_lazy_type_only_relative_and_dynamic_imports():
    path = ROOT / "protocol" / "probe.py"
    found = imports_of(_PROBE, path, "protocol.probe")
    targets = {imp.target for imp in found}
    assert {"concurrent.futures", "bittensor.sp_core.Keypair", "protocol.wire", "transport.bucket.Bucket",
            "bittensor", "neurons.node", "boto3.session"} <= targets
    lines = {imp.target: imp.line for imp in found}
    assert lines["transport.bucket.Bucket"] == 8 and lines["bittensor"] == 11
    bad = protocol_violations(found)
    assert any("protocol/probe.py:4:" in b and "concurrent.futures" in b for b in bad)
    assert any("protocol/probe.py:11:" in b and "`import bittensor as bt`" in b for b in bad)
    assert any("protocol/probe.py:13:" in b and "boto3" in b for b in bad)
    assert any("must not import transport/" in b for b in bad)
    assert any("must not import neurons/" in b for b in bad)
    assert not any(":5:" in b for b in bad)  # bittensor.sp_core is the allowed exception
    assert not any(":6:" in b for b in bad)  # protocol importing protocol
    up = layer_violations(found)
    assert len(up) == 2 and all("protocol/ must not import" in u for u in up)


def test_layer_rule_forbids_sideways_and_upward_imports_only():
    path = ROOT / "gauntlet" / "probe.py"
    source = "from transport.fetch import ShardSource\nimport protocol.wire\nfrom . import filters\n"
    bad = layer_violations(imports_of(source, path, "gauntlet.probe"))
    assert bad == ["gauntlet/probe.py:1: `from transport.fetch import ShardSource`: gauntlet/ must not import "
                   "transport/ (gauntlet may import gauntlet, protocol)"]
    devnet = imports_of("import bench.codec\nfrom neurons import miner\n", ROOT / "devnet" / "probe.py", "devnet.probe")
    assert [b.split(": ")[0] for b in layer_violations(devnet)] == ["devnet/probe.py:1"]


def test_cycle_finder_reports_the_cycle_with_its_statements():
    def edge(a: str, b: str, line: int) -> Import:
        return Import(a, ROOT / (a.replace(".", "/") + ".py"), line, b, f"import {b}")

    graph = {
        "p.a": {"p.b": edge("p.a", "p.b", 3)},
        "p.b": {"p.c": edge("p.b", "p.c", 4)},
        "p.c": {"p.a": edge("p.c", "p.a", 5), "p.d": edge("p.c", "p.d", 6)},
        "p.d": {},
    }
    assert strongly_connected(graph) == [["p.a", "p.b", "p.c"]]
    cycle = cycle_in(["p.a", "p.b", "p.c"], graph)
    assert [(a, b, e.line) for a, b, e in cycle] == [("p.a", "p.b", 3), ("p.b", "p.c", 4), ("p.c", "p.a", 5)]
    del graph["p.c"]["p.a"]
    assert strongly_connected(graph) == []
