"""The module structure ARCHITECTURE.md describes: facebatch's modules import each other one way.

Imports inside functions count too: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "facebatch"


def internal_imports() -> dict[str, set[str]]:
    """module -> the facebatch modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import y
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x, y
                    deps.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("facebatch."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "facebatch":
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("facebatch."))
        deps.discard(name)
    modules = set(graph)
    return {name: {d for d in deps if d in modules} for name, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = internal_imports()
    assert "out" in graph and "recovery" in graph  # the scan sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_recovery_does_not_know_the_jobs_it_finishes():
    """A swap's journal says everything needed to finish it (facebatch.swap)."""
    graph = internal_imports()
    for module in ("recovery", "swap", "publishing", "writing", "out"):
        assert not graph[module] & {"compact", "people", "pipeline", "cli", "query"}, (module, graph[module])


def test_only_the_pipeline_imports_ray_data():
    for path in PACKAGE.glob("*.py"):
        if path.stem == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray.data" or n.startswith("ray.data.") for n in names), path.name


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter (an import cycle at module level fails here)."""
    names = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__main__")
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module('facebatch.' + n)\n"

    def import_alone(name: str) -> tuple[str, subprocess.CompletedProcess]:
        return name, subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True)

    # One interpreter per core of the test machine (2): the imports are CPU-bound (38 s one at a time).
    with ThreadPoolExecutor(2) as pool:
        for name, result in pool.map(import_alone, names):
            assert result.returncode == 0, f"facebatch.{name}: {result.stderr[-2000:]}"


def test_the_driver_side_does_not_import_torch_or_opencv():
    """The CLI, the jobs' entrypoints and what a run's driver uses (plan, write, publish, compact,
    people's orchestration) import neither torch nor OpenCV: torch alone takes about a second and
    180 MiB, in a driver that only orchestrates; only the actors need them."""
    code = ("import sys, runpy\n"
            "import facebatch.cli, facebatch.pipeline, facebatch.plan, facebatch.writing, facebatch.publishing\n"
            "import facebatch.compact, facebatch.people, facebatch.recovery, facebatch.query, facebatch.config\n"
            "for job in sys.argv[1:]:\n"
            "    runpy.run_path(job, run_name='not_main')\n"
            "print(sorted(m for m in ('torch', 'cv2', 'numba') if m in sys.modules))\n")
    jobs = [str(p) for p in sorted((PACKAGE.parent / "jobs").glob("*.py"))]
    result = subprocess.run([sys.executable, "-c", code, *jobs], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
