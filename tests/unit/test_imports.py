"""No import cycle in the package: every module imports alone, and no import, even a deferred one, closes a loop.

A cycle hides while some other module happens to be imported first; a fresh interpreter per module
takes that luck away (aiohttp keeps the same test). An import inside a function is a cycle put off,
not removed, so the second test reads every import statement of the source.
"""

import ast
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import listenerd

MODULES = ["listenerd", *sorted(name for _, name, _ in pkgutil.walk_packages(listenerd.__path__, "listenerd."))]


def import_alone(module: str) -> str | None:
    """None when `module` imports in a fresh interpreter; else the end of its traceback."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else f"{module}:\n{done.stderr[-2000:]}"


def test_every_module_imports_on_its_own():
    assert "listenerd.daemon" in MODULES and "listenerd.api.app" in MODULES  # the walk found the package
    importable = [name for name in MODULES if name != "listenerd.__main__"]  # that one runs the CLI
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [failure for failure in pool.map(import_alone, importable) if failure]
    assert not failures, "\n".join(failures)


def imported_by(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its source, at the top or in a function."""
    tree = ast.parse(Path(find_spec(module).origin).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & set(MODULES)


def test_no_import_closes_a_loop():
    graph = {module: imported_by(module) for module in MODULES}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in MODULES:
        visit(module, [module])
    assert not cycles, "\n".join(cycles)
