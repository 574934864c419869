"""The package's shape, read with ast (nothing is imported): layers import downward only, only
cli/ parses arguments, no module is private to another, and no module grows past 450 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llava_core"
MAX_LINES = 450
# Each layer may import the layers before it in this order (and itself), never one after it.
LAYERS = ["atomic", "model", "checkpoints", "runtime", "data", "default", "eval", "train", "research",
          "testing", "serve", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, names imported from it, line) for every llava_core import in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from . import x` imports the module x
            if all(f"{target}.{n}" in MODULES for n in names):
                found += [(f"{target}.{n}", [], node.lineno) for n in names]
            else:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [(t, n, line) for t, n, line in found if t == "llava_core" or t.startswith("llava_core.")]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for t, _, _ in _imports(name, path) if t in MODULES and t != name}
    return graph


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules (__init__ re-exports)
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_import_downward_only():
    upward = []
    for name, path in MODULES.items():
        if path.name == "__main__.py":
            continue  # `python -m` shims may hand over to cli/
        here = _layer(name)
        for target, _, line in _imports(name, path):
            there = _layer(target)
            if here in LAYERS and there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_every_module_sits_in_a_known_layer():
    assert {_layer(n) for n in MODULES if n != "llava_core"} <= set(LAYERS) | {"__main__"}


def test_nothing_outside_cli_imports_cli():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
           for name, path in MODULES.items() if _layer(name) != "cli" and path.name != "__main__.py"
           for target, _, line in _imports(name, path) if _layer(target) == "cli"]
    assert not bad, "\n".join(bad)


def test_only_cli_and_main_shims_parse_arguments():
    bad = []
    for name, path in MODULES.items():
        if _layer(name) == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if "argparse" in mods:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, "argparse outside cli/: " + ", ".join(bad)


def test_no_module_takes_another_modules_private_names():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} takes {target}.{n}"
           for name, path in MODULES.items() for target, names, line in _imports(name, path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE.parent)} has {n} lines (at most {MAX_LINES})"


def test_the_test_sees_what_it_checks():
    """The checks above would pass vacuously on a wrong path or a broken import reader."""
    assert len(MODULES) > 40 and "llava_core.model.llava" in MODULES
    imports = {t for t, _, _ in _imports("llava_core.model.llava", MODULES["llava_core.model.llava"])}
    assert {"llava_core.model.config", "llava_core.model.llama", "llava_core.model.vision"} <= imports
    assert "llava_core.cli.common" in _graph()["llava_core.cli.ask"]
