"""The roles hold: the device and the server do not know they are simulated, and what leaves a
device is built in one place, :mod:`fedpref.models.wire`.

(Which folder may import which is tests/test_boundaries.py; here: relative imports too, the
simulation's fault keys, and where replies are built.)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("client", "server", "models", "simulations", "fedpref")
WIRE = ROOT / "models" / "wire.py"

# What only a simulation knows: its fault keys (run config and node config) and its names.
FAULT_KEYS = {"dropout", "stragglers", "straggler-delay", "availability", "simulated-clock"}
FAULT_FIELDS = {"dropout", "stragglers", "straggler_delay", "availability"}  # FederatedConfig's fields for them
FAULT_NAMES = {"DroppedOut", "SIMULATED_CLOCK", "drops_out", "straggles", "answers_late", "AvailabilityPattern", "availability_mod"}

# What a device's training reply carries (fedpref.models.wire.training_metrics).
REPLY_METRICS = {"num-examples", "train-loss", "update-norm"}
NORM_BIT_NAMES = {"KEY_NORM_BIT", "NORM_BIT"}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def tree_of(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def simulation_imports(path: Path, folder: str) -> list[str]:
    """Imports of fedpref.simulations, absolute or relative (``from ..simulations import x``)."""
    package = ["fedpref", folder, *path.relative_to(ROOT / folder).parts[:-1]]
    found = []
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # relative: from this file's package, ``level - 1`` packages up
                base = ".".join([*package[: len(package) - node.level + 1], node.module or ""]).rstrip(".")
            modules = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found += [m for m in modules if m.startswith("fedpref.simulations") or m.split(".")[0] == "simulations"][:1]
    return found


def fault_mentions(path: Path) -> list[str]:
    """The simulation's fault keys and names in the code (strings, attributes, names; not prose)."""
    found = []
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAULT_KEYS:
            found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in FAULT_FIELDS | FAULT_NAMES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in FAULT_NAMES:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in FAULT_NAMES | {"availability"}:
            found.append(f"import {node.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "availability":
            found.append(f"{node.lineno}: from {node.module}")
    return found


def reply_building(path: Path) -> list[str]:
    """Places that assemble a training reply: a dict literal with the reply's metric keys or its
    norm bit, a store of the norm bit, a legacy ``FitRes``."""
    found = []
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value in REPLY_METRICS:
                    found.append(f"{node.lineno}: a reply's metrics {key.value!r}")
                elif isinstance(key, ast.Name) and key.id in NORM_BIT_NAMES:
                    found.append(f"{node.lineno}: the norm bit")
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.slice, ast.Name) and node.slice.id in NORM_BIT_NAMES:
                found.append(f"{node.lineno}: sets the norm bit")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name == "FitRes":
                found.append(f"{node.lineno}: FitRes")
    return found


@pytest.mark.parametrize("folder", ["client", "server"])
def test_device_and_server_do_not_import_the_simulations(folder):
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in python_files(folder) for name in simulation_imports(p, folder)]
    assert not offenders, "; ".join(offenders)


@pytest.mark.parametrize("folder", ["client", "server"])
def test_device_and_server_do_not_know_the_simulated_faults(folder):
    offenders = [f"{p.relative_to(ROOT)}:{m}" for p in python_files(folder) for m in fault_mentions(p)]
    assert not offenders, "; ".join(offenders)


def test_replies_are_built_only_by_the_wire_module():
    offenders = [f"{p.relative_to(ROOT)}:{m}" for p in python_files(*SOURCE) if p != WIRE for m in reply_building(p)]
    assert not offenders, "; ".join(offenders)


def test_the_checks_would_catch_what_they_forbid(tmp_path):
    """The scans find what they look for (so that a pass means something)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from fedpref.simulations.engines.device import DroppedOut\n"
        "from ..simulations import device\n"
        "sent = MetricRecord({'num-examples': 1})\n"
        "sent[KEY_NORM_BIT] = 1\n"
        "reply = FitRes(status, parameters, num_examples=1, metrics={})\n"
        "if config.stragglers > 0 and context.node_config.get('simulated-clock'):\n    pass\n"
    )
    assert len(reply_building(sample)) == 3
    mentions = " ".join(fault_mentions(sample))
    assert all(m in mentions for m in ("DroppedOut", ".stragglers", "'simulated-clock'"))
    nested = tmp_path / "client" / "sub"
    nested.mkdir(parents=True)
    inner = nested / "x.py"
    inner.write_text("from ...simulations import device\nfrom fedpref.simulations.engines.fast import FastGrid\nfrom ..models import wire\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(simulation_imports(inner, "client")) == 2
    finally:
        ROOT = saved


def empty_containers(path: Path) -> list[str]:
    """Module-level names bound to an empty list, dict or set (a display or a call without
    arguments): the shape of a registry that things are added to at run time."""
    found = []
    for node in tree_of(path).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            empty = (isinstance(value, (ast.List, ast.Set)) and not value.elts) or (isinstance(value, ast.Dict) and not value.keys) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in {"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "WeakValueDictionary"} and not value.args
            )
            if empty:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [f"{path.name}:{node.lineno}: {ast.unparse(t)}" for t in targets]
    return found


def test_no_module_keeps_a_registry():
    """Callbacks, observers, open devices and pending notes belong to the object of a run or an
    app (ServerHooks, DeviceApp), never to a module that one run would leave to the next."""
    offenders = [m for p in python_files(*SOURCE) for m in empty_containers(p)]
    assert not offenders, "module-level registries: " + "; ".join(offenders)


def test_the_registry_probe_finds_one(tmp_path):
    planted = tmp_path / "registry.py"
    planted.write_text("_CALLBACKS: list = []\n_OPEN = {}\nSEEN = set()\nOK = (1, 2)\nTABLE = {1: 2}\n")
    assert len(empty_containers(planted)) == 3


def grid_probes(path: Path) -> list[str]:
    """``hasattr``/``getattr`` on a grid (a name or attribute that reads as one: ``grid``,
    ``inner``, ``self._grid``): asking what engine one runs on instead of calling the
    :class:`fedpref.server.grid.EngineGrid` methods every grid has."""
    found = []
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and node.args:
            target = ast.unparse(node.args[0]).lower()
            if "grid" in target or "inner" in target:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_probes_a_grid():
    offenders = [m for p in python_files(*SOURCE) for m in grid_probes(p)]
    assert not offenders, "; ".join(offenders)


def test_the_grid_probe_finds_one(tmp_path):
    planted = tmp_path / "probe.py"
    planted.write_text("if hasattr(grid, 'device_keys'):\n    pass\nx = getattr(self.inner, 'updates', None)\ny = getattr(config, 'seed')\n")
    assert len(grid_probes(planted)) == 2
