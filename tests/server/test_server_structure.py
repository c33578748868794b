"""The server's wiring: Flower is used, never patched; the server never asks what its grid is;
and no module of the server keeps a registry that one run could leave to the next."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"


def _modules() -> list[Path]:
    return sorted(SERVER.glob("*.py"))


WIRING = ("app.py", "grid.py", "strategy.py", "rounds.py", "secure.py")  # what runs a round


def test_importing_the_server_leaves_flowers_sampling_its_own():
    """The seeded cohort sampler is passed to the strategy; Flower's ``sample_nodes`` stays
    Flower's in every module that uses it (checked in a fresh process: no test imported first)."""
    code = (
        "import flwr.serverapp.strategy.fedavg as fedavg, flwr.serverapp.strategy.strategy_utils as utils\n"
        "before = (fedavg.sample_nodes, utils.sample_nodes)\n"
        "import fedpref.server.app, fedpref.server.strategy, fedpref.server.secure, fedpref.server.grid\n"
        "assert (fedavg.sample_nodes, utils.sample_nodes) == before, 'a fedpref module replaced Flower sample_nodes'\n"
        "assert fedavg.sample_nodes.__module__ == 'flwr.serverapp.strategy.strategy_utils'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_server_module_assigns_to_anything_of_flower(path):
    """No ``flwr...x = ...`` and no ``setattr(<a flwr module>, ...)``: the server composes Flower, never patches it."""
    tree = ast.parse(path.read_text())
    flower_names = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names if alias.name.startswith("flwr")}
    flower_names |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and (node.module or "").startswith("flwr") and not node.level for alias in node.names}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute):
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                assert not (isinstance(root, ast.Name) and root.id in flower_names), f"{path.name}:{node.lineno} assigns to Flower's {ast.unparse(target)}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            first = node.args[0]
            assert not (isinstance(first, ast.Name) and first.id in flower_names), f"{path.name}:{node.lineno} setattr on Flower"


def _grid_probes(tree: ast.AST) -> list[str]:
    """``hasattr(x, ...)``/``getattr(x, ...)`` calls whose object is named like a grid."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and node.args:
            subject = ast.unparse(node.args[0])
            if "grid" in subject.lower() or "stable" in subject.lower() or "secure" in subject.lower():
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_the_server_calls_its_grid_never_asks_what_it_is(path):
    """What a grid can do is a method of fedpref.server.grid.EngineGrid, with its default."""
    assert _grid_probes(ast.parse(path.read_text())) == []


def test_the_app_module_has_no_hasattr_or_getattr_at_all():
    source = (SERVER / "app.py").read_text()
    assert "hasattr(" not in source and "getattr(" not in source


def _module_level_mutables(tree: ast.Module) -> list[str]:
    """Module-level names bound to a list, dict or set (a display, a comprehension or a call of
    list/dict/set/defaultdict/deque): state one run would leave to the next."""
    mutable_calls = {"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "Counter"}
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            names = [ast.unparse(t) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
            if value is None:
                continue
            if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in mutable_calls
            ):
                found += [f"line {node.lineno}: {name}" for name in names]
    return found


@pytest.mark.parametrize("path", [SERVER / name for name in WIRING], ids=lambda p: p.name)
def test_no_module_that_runs_a_round_keeps_a_mutable_registry(path):
    """Observers and callbacks are passed to a run (fedpref.server.app.ServerHooks), not
    registered in a module; constants are tuples, frozensets or mappings nobody appends to."""
    assert _module_level_mutables(ast.parse(path.read_text())) == []


def test_the_registries_a_run_once_needed_are_gone():
    app = importlib.import_module("fedpref.server.app")
    secure = importlib.import_module("fedpref.server.secure")
    for module, names in ((app, ("add_round_callback", "add_exchange_observer", "clear_round_callbacks", "clear_exchange_observers",
                                 "_round_callbacks", "_exchange_observers")),
                          (secure, ("add_sum_observer", "clear_sum_observers", "_sum_observers"))):
        assert [n for n in names if n in vars(module)] == []


def test_the_checks_find_what_they_look_for():
    """The probes above are not vacuous: they find a patch, a grid probe and a registry."""
    tree = ast.parse("import flwr.serverapp.strategy.fedavg as f\nf.sample_nodes = None\n_observers: list = []\n"
                     "def g(grid):\n    return hasattr(grid, 'device_keys')\n")
    assert _grid_probes(tree) and _module_level_mutables(tree)
    with pytest.raises(AssertionError, match="assigns to Flower"):
        tmp = SERVER.parent / "tests" / "server" / "_probe_flower_patch.py"
        try:
            tmp.write_text("import flwr.serverapp.strategy.fedavg as f\nf.sample_nodes = None\n")
            test_no_server_module_assigns_to_anything_of_flower(tmp)
        finally:
            tmp.unlink()


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
@pytest.mark.parametrize("aggregation", ["mean", "median", "trimmed-mean", "central-dp"])
def test_every_strategy_is_a_named_class_composed_of_flowers(strategy, aggregation):
    """No class is built at run time: each run config gets one of the named classes, above the
    Flower optimiser of its name, whatever average it takes."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

    from fedpref.models.config import FederatedConfig
    from fedpref.server.strategy import STRATEGIES, CohortsAndAverage, FedprefStrategy, make_strategy

    values = {"catalogue-size": 30, "devices": 8, "dim": 4, "strategy": strategy}
    values.update({"dp-noise-multiplier": 0.5} if aggregation == "central-dp" else {"aggregation": aggregation})
    made = make_strategy(FederatedConfig.from_run_config(values), 8, lambda report: None)
    flower = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}[strategy]
    assert type(made) is STRATEGIES[strategy] and type(made).__module__ == "fedpref.server.strategy"
    assert isinstance(made, FedprefStrategy) and isinstance(made, flower) and isinstance(made, CohortsAndAverage)
    assert len({type(make_strategy(FederatedConfig.from_run_config(values), 8, lambda report: None)) for _ in range(2)}) == 1
