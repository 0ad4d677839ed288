"""The import rule of the README, checked on the source: what each part may see, that
only the CLI looks a policy up in the registry, and that no two modules import each
other (lazily or not). A new import that breaks the layout fails here, by name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("overcommitd", "policies", "sim")
CLI_MODULES = {"overcommitd.__main__", "overcommitd.cli", "sim.cli", "sim.trace_cli"}
# What the simulator may see of the daemon: the vocabulary, the step and its guard, the
# Hypervisor protocol, the trace format it shares with the recorder and the shortfall estimate. Never libvirt,
# QMP or the runner.
SIM_SEES = {
    "overcommitd",
    "overcommitd.model",
    "overcommitd.table",
    "overcommitd.config",
    "overcommitd.guard",
    "overcommitd.guard_kernels",  # the guard's rules as column kernels; the replay compiles them
    "overcommitd.loop",
    "overcommitd.hypervisor",
    "overcommitd.traceformat",
    "overcommitd.shortfall",  # the daemon's own "host short by N GiB" estimate, so both say the same
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child):
            continue
        yield child
        yield from _walk(child)


def imports(name: str) -> set[str]:
    """Our modules that ``name`` imports, at module level or inside a function."""
    out: set[str] = set()
    for node in _walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return out


GRAPH = {name: imports(name) for name in MODULES}


def test_policies_see_only_the_vocabulary() -> None:
    bad = {
        (m, t)
        for m, ts in GRAPH.items()
        if m.startswith("policies")
        for t in ts
        if not (t.startswith("policies") or t in {"overcommitd.model", "overcommitd.table"})
    }
    assert not bad, f"policies may import only overcommitd.model and .table: {sorted(bad)}"


def test_sim_sees_the_step_never_a_backend_or_a_concrete_policy() -> None:
    bad = set()
    for m, ts in GRAPH.items():
        if not m.startswith("sim") or m in CLI_MODULES:
            continue
        for t in ts:
            if t.startswith("overcommitd") and t not in SIM_SEES:
                bad.add((m, t))
            if t.startswith("policies") and t != "policies.api":
                bad.add((m, t))
    assert not bad, f"sim imports beyond the step and the Policy protocol: {sorted(bad)}"


@pytest.mark.parametrize(
    ("lower", "upper"),
    [("sim.virtio", "sim.memory"), ("sim.virtio", "sim.evaluation"), ("sim.memory", "sim.evaluation")],
)
def test_sim_layers_point_one_way(lower: str, upper: str) -> None:
    bad = {(m, t) for m, ts in GRAPH.items() if m.startswith(lower) for t in ts if t.startswith(upper)}
    assert not bad, f"{lower} must not import {upper}: {sorted(bad)}"


def test_nothing_below_the_cli_imports_it() -> None:
    bad = {(m, t) for m, ts in GRAPH.items() if m not in CLI_MODULES for t in ts if t in CLI_MODULES}
    assert not bad, f"the CLI wires the parts; no part imports it: {sorted(bad)}"


def test_only_the_cli_uses_the_registry() -> None:
    users = {m for m, ts in GRAPH.items() if "policies.registry" in ts}
    assert users <= CLI_MODULES, f"the registry is the CLI's: {sorted(users - CLI_MODULES)}"


def test_no_module_imports_back_into_itself() -> None:
    """No cycle of any length (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_a_balloon_constant_is_defined_once() -> None:
    names = {"BALLOON_PAGE_KIB", "VIRTIO_BALLOON_PFN_SHIFT", "BALLOON_PAGE_BYTES"}
    defined = [
        (t.id, m)
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in names
    ]
    twice = {n for n, _ in defined if sum(1 for d, _ in defined if d == n) > 1}
    assert not twice, f"defined in more than one place: {sorted(d for d in defined if d[0] in twice)}"
