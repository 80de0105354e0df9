"""The package's structure, as the README's architecture section states it: no import cycles, no
private names imported across packages, and the light entry points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import influence_hooks

ROOT = Path(influence_hooks.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, list[tuple[str, str, int]]]:
    """{module: [(imported module, imported name or '', line)]} for imports inside influence_hooks,
    wherever they stand (functions included), except under `if TYPE_CHECKING:`."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
        edges = []
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if _is_package(sub) or (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file():
                        edges.append((sub, "", node.lineno))
                    else:
                        edges.append((target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                edges += [(a.name, "", node.lineno) for a in node.names]
        out[module] = [e for e in edges if e[0].split(".")[0] == "influence_hooks"]
    return out


def _package_of(module: str) -> str:
    return module if _is_package(module) else module.rsplit(".", 1)[0]


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _, _ in edges if t != m} for m, edges in _imports().items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    for m in graph:
        if _is_package(m):
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_private_name_is_imported_across_packages():
    bad = []
    for module, edges in _imports().items():
        for target, name, line in edges:
            private = name.startswith("_") and not name.startswith("__")
            if private and _package_of(target) != _package_of(module):
                bad.append(f"{module}:{line} imports {target}.{name}")
    assert not bad, bad


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_plain_pytorch_recorder_loads_neither_lightning_nor_matplotlib():
    out = _fresh("import sys; from influence_hooks import GradientRecorder, open_run, tracin, dit; "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
                 "'matplotlib', 'torchmetrics')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_command_line_help_loads_no_torch():
    out = _fresh("import sys; from influence_hooks.cli import build_parser; build_parser().format_help(); "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'matplotlib')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    done = subprocess.run([sys.executable, "-m", "influence_hooks.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "COMMAND" in done.stdout
