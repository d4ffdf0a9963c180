"""The layers, kept by a test: every import of every module, read from its source, goes downward.

  btcfeed (common/)              the library: config, keys, trade, wsframes, events, ...
    btcfeed.exchanges            the exchange adapters          -> the library
    btcfeed.storage              Redis: apply script, bus, ...  -> the library
    btcfeed.lifecycle            a process's life, logs         -> library, storage
    btcfeed.observability        status document, metrics       -> library, storage
  btcfeed.processes (processes/) the supervised programs        -> all of the above
  btcfeed.commands               operator commands              -> everything above but processes
  tools/                         simulator, benches, chaos, demo (not installed) -> anything
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = "btcfeed"
LAYERS = {            # layer -> the layers it may import (its own included)
    "library": {"library"},
    "exchanges": {"library", "exchanges"},
    "storage": {"library", "storage"},
    "lifecycle": {"library", "storage", "lifecycle"},
    "observability": {"library", "storage", "observability"},
    "processes": {"library", "exchanges", "storage", "lifecycle", "observability", "processes"},
    "commands": {"library", "exchanges", "storage", "lifecycle", "observability", "commands"},
}
SUBPACKAGES = ("exchanges", "storage", "observability", "processes", "commands")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "tools":
        return "tools"
    if parts[0] != LIBRARY:
        return "outside"
    if parts[1:2] == ["lifecycle"]:
        return "lifecycle"
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "library"


def modules():
    """(module name, path) of every module of the installed package, from its source folders."""
    for folder, package in (("common", LIBRARY), ("processes", f"{LIBRARY}.processes")):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            relative = os.path.relpath(directory, os.path.join(ROOT, folder))
            prefix = package if relative == "." else package + "." + relative.replace(os.sep, ".")
            for name in files:
                if name.endswith(".py") and "__pycache__" not in directory:
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    yield module, os.path.join(directory, name)


def imports_of(path: str):
    """Every module an import statement names, wherever it stands (inside functions too)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


MODULES = sorted(modules())


def test_every_module_of_the_package_is_found():
    names = {name for name, _ in MODULES}
    assert {"btcfeed.keys", "btcfeed.storage.apply", "btcfeed.processes.writer",
            "btcfeed.commands.cli"} <= names


@pytest.mark.parametrize("module,path", MODULES, ids=[name for name, _ in MODULES])
def test_imports_only_go_downward(module, path):
    allowed = LAYERS[layer_of(module)]
    wrong = sorted({name for name in imports_of(path)
                    if layer_of(name) not in ("outside",) and layer_of(name) not in allowed
                    and not (module == "btcfeed.commands.cli" and layer_of(name) == "tools")})
    assert not wrong, f"{module} ({layer_of(module)}) imports {wrong}"


def test_only_the_command_line_reaches_the_tools_and_only_inside_its_commands():
    """bench, chaos and demo run from a checkout; an installed package must import without tools/."""
    path = dict(MODULES)["btcfeed.commands.cli"]
    tree = ast.parse(open(path).read(), path)
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in top_level
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools")]


def test_the_tools_are_not_installed():
    import setuptools.config.setupcfg as setupcfg
    options = setupcfg.read_configuration(os.path.join(ROOT, "setup.cfg"))["options"]
    assert all(package.startswith(LIBRARY) for package in options["packages"])
    assert options["package_dir"] == {LIBRARY: "common", f"{LIBRARY}.processes": "processes"}


def test_the_client_needs_only_redis_and_the_standard_library():
    """btcfeed.client runs with the wheel and redis-py alone: it imports the standard library, redis
    and btcfeed.keys (plain string building, itself importing nothing of btcfeed), nothing else."""
    import sys
    paths = dict(MODULES)
    imported = set(imports_of(paths["btcfeed.client"]))
    assert "redis" in imported and "btcfeed.keys" in imported
    foreign = sorted(name for name in imported
                     if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "redis"
                     and name not in ("btcfeed", "btcfeed.keys"))
    assert not foreign, f"btcfeed.client imports {foreign}"
    keys_imports = [name for name in imports_of(paths["btcfeed.keys"])]
    assert not [name for name in keys_imports if name.split(".")[0] not in sys.stdlib_module_names]
