"""A simulated device's own history, read from a population folder (what :mod:`fedpref.simulations.engines.device` plays).

In a simulation the ``simulations`` package writes every user's split once, as memory-mapped
NumPy files (see ``fedpref.simulations.data.population``); each virtual device opens the folder
and reads its own row only. A real device reads its events from its own store instead.

Folder layout: ``meta.json`` (``n_users``, ``n_items``, ``name``, ``seed``) and
``train_indptr.npy``, ``train_items.npy``, ``val_item.npy``, ``test_item.npy``,
``negatives.npy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

FILES = ("train_indptr", "train_items", "val_item", "test_item", "negatives")


class HistoryError(RuntimeError):
    """The device cannot find or read its history."""


@dataclass(frozen=True)
class DeviceHistory:
    """What one device holds: its training items, its two held-out items and its fixed negatives."""

    user: int
    n_items: int
    train_items: np.ndarray
    val_item: int
    test_item: int
    negatives: np.ndarray

    def target(self, which: str) -> int:
        return self.val_item if which == "val" else self.test_item


@lru_cache(maxsize=4)
def _open(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(folder)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise HistoryError(
            f"no device histories in {folder!r} (meta.json missing); write them with "
            "`fedpref population --dataset movielens-small --out DIR` and pass history-dir=DIR"
        )
    meta = json.loads(meta_file.read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in FILES}
    return meta, arrays


def load_history(folder: str, user: int) -> DeviceHistory:
    """Read device ``user``'s row of the population in ``folder``."""
    if not folder:
        raise HistoryError(
            "run-config 'history-dir' is empty: a simulated device needs the folder of device "
            "histories; `fedpref simulate` writes and passes it, or write one with "
            "`fedpref population --dataset movielens-small --out DIR` and pass history-dir=DIR"
        )
    meta, a = _open(str(Path(folder).resolve()))
    if not 0 <= user < meta["n_users"]:
        raise HistoryError(f"device {user} does not exist: {folder} holds {meta['n_users']} devices")
    lo, hi = int(a["train_indptr"][user]), int(a["train_indptr"][user + 1])
    return DeviceHistory(
        user=user,
        n_items=int(meta["n_items"]),
        train_items=np.array(a["train_items"][lo:hi], dtype=np.int64),
        val_item=int(a["val_item"][user]),
        test_item=int(a["test_item"][user]),
        negatives=np.array(a["negatives"][user], dtype=np.int64),
    )


def population_size(folder: str) -> int:
    meta, _ = _open(str(Path(folder).resolve()))
    return int(meta["n_users"])
