"""Hand every user's history to one virtual device: write a split as a population folder.

The folder is what ``fedpref.simulations.engines.history`` reads (each device its own row, memory-mapped),
and what the server reads the catalogue size from (``meta.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedpref.models.files import open_private, private_folder, write_private

from fedpref.simulations.data.split import LeaveOneOutSplit


def write_population(split: LeaveOneOutSplit, folder: str | Path) -> Path:
    """Write ``split`` to ``folder``: every person's history, so readable by its owner only
    (files 0600; the folder, if this creates it, 0700)."""
    folder = private_folder(folder)
    arrays = {
        "train_indptr": split.train_indptr,
        "train_items": split.train_items,
        "val_item": split.val_item,
        "test_item": split.test_item,
        "negatives": split.negatives,
    }
    for name, values in arrays.items():
        with open_private(folder / f"{name}.npy") as f:
            np.save(f, np.ascontiguousarray(values, dtype=np.int64))
    meta = {"name": split.name, "n_users": split.n_users, "n_items": split.n_items, "seed": split.seed}
    write_private(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return folder


def read_meta(folder: str | Path) -> dict:
    """A population folder's ``meta.json`` (``n_users``, ``n_items``, ``name``, ``seed``)."""
    meta = Path(folder) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"no population in {folder} (meta.json missing): write one with `fedpref population --dataset NAME --out {folder}`")
    return json.loads(meta.read_text())


def popularity_hr(folder: str | Path, *, k: int = 10, seed: int = 0, chunk: int = 200_000) -> float:
    """Test HR@k on the sampled candidates of recommending every device the items most devices
    trained on (the popularity baseline), from a population folder alone."""
    from fedpref.models.metrics import hit_rate, rank_of_target

    meta = read_meta(folder)
    load = lambda name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r")  # noqa: E731
    counts = np.bincount(np.asarray(load("train_items")), minlength=int(meta["n_items"])).astype(np.float64)
    test, negatives = load("test_item"), load("negatives")
    rng = np.random.default_rng([seed, 1])
    ranks = np.concatenate([rank_of_target(counts[np.asarray(test[lo : lo + chunk])], counts[np.asarray(negatives[lo : lo + chunk])], rng)
                            for lo in range(0, int(meta["n_users"]), chunk)])
    return hit_rate(ranks, k)


def write_device_stores(population: str | Path, out: str | Path, *, consent: str = "federated", kinds=None, devices=None, progress: bool = False) -> Path:
    """One device store per device of a population folder (``out``/device-<i>.sqlite), holding
    its training history as ``view`` events and the given consent, as if each person had
    opted in. A simulation with run-config ``store-dir=OUT`` then trains from the stores, so
    each virtual device keeps its consent and its record of what left (docs/device.md)."""
    import time

    from fedpref.client.device import Device
    from fedpref.simulations.engines.history import load_history, population_size

    from fedpref.simulations.progress import progress_bar

    out = private_folder(out)
    indices = range(population_size(str(population))) if devices is None else devices
    now = time.time()
    with progress_bar(len(indices), "device stores", enabled=progress) as advance:
        for i in indices:
            history = load_history(str(population), int(i))
            n = len(history.train_items)
            with Device.open(out / f"device-{i}.sqlite", user=int(i)) as device:
                device.set_consent(consent, kinds, source="simulation")
                device.record_many((int(item), "view", None, now - (n - j)) for j, item in enumerate(history.train_items))
            advance()
    return out
