"""The pure library never imports ray, deepspeed or vllm (DESIGN: launch -> actors -> rlhf), and
the import graph has no circles and no arrow that runs back up."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


def test_rlhf_imports_with_ray_deepspeed_vllm_blocked():
    code = textwrap.dedent(
        """
        import sys
        for name in ("ray", "deepspeed", "vllm"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import importlib, pkgutil, rlhf
        mods = [m.name for m in pkgutil.walk_packages(rlhf.__path__, "rlhf.")]
        for m in mods:
            importlib.import_module(m)
        import torch
        from rlhf.losses import preference_loss
        loss, _ = preference_loss("sigmoid", torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
        assert abs(loss.item() - 0.6931471805599453) < 1e-6
        from rlhf.config import load_config
        load_config(None, ["algorithm=orpo"])
        print(len(mods))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip().splitlines()[-1]) >= 15


# ----------------------------------------------------------------------------- import graph

ROOT = Path(__file__).resolve().parents[1]
#: Packages from the bottom floor up: a module may import its own floor or the ones below.
FLOORS = ("rlhf", "actors", "launch", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, anywhere in the file (imports inside
    functions too: a lazy import ties two files as much as a top-level one)."""
    files = {_module_name(p): p for f in FLOORS for p in (ROOT / f).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` names the submodule where one exists.
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for c in candidates:
                # The longest project module the dotted name starts with.
                while c and c not in files:
                    c = c.rpartition(".")[0]
                if c and c != name:
                    targets.add(c)
                    break
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_and_graph_reader_on_a_known_graph():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    # Lazy and `from package import module` imports are read.
    assert "actors.offline" in graph["actors.coordinator"]
    assert "rlhf.rollout" in graph["actors.base"]  # inside a method
    assert "rlhf.data" in graph["actors.offline"]


def test_no_import_circles_and_no_import_runs_back_up():
    """DESIGN: launch -> actors -> rlhf, and no two files that need each other."""
    graph = import_graph()
    assert cycles(graph) == [], "import circles"
    floor = {name: FLOORS.index(name.split(".")[0]) for name in graph}
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor[b] > floor[a]
    )
    assert upward == [], "imports that run back up a floor"


def test_actors_are_called_only_through_their_groups():
    """DESIGN: actors/groups.py is the only place that calls `.remote(`; the loops call typed
    group methods that return futures."""
    calls = sorted(
        f"{path.relative_to(ROOT)}:{n}"
        for floor in FLOORS
        for path in (ROOT / floor).rglob("*.py")
        if path != ROOT / "actors" / "groups.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ".remote(" in line
    )
    assert calls == [], "actor calls outside actors/groups.py"


def test_each_actor_gets_only_its_own_sub_config():
    """DESIGN: the driver cuts each role's share of the RunConfig (rlhf.roles); the actor
    files never see the whole run's config."""
    actor_files = ("base", "policy", "reference", "reward", "rollout", "rollout_vllm")
    seen = sorted(
        f"actors/{name}.py:{n}"
        for name in actor_files
        for n, line in enumerate((ROOT / "actors" / f"{name}.py").read_text().splitlines(), 1)
        if "RunConfig" in line
    )
    assert seen == [], "an actor that receives the whole RunConfig"
