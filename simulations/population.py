"""Hand every user's history to one virtual device: write a split as a population folder.

The folder is what ``fedpref.client.history`` reads (each device its own row, memory-mapped),
and what the server reads the catalogue size from (``meta.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .split import LeaveOneOutSplit


def write_population(split: LeaveOneOutSplit, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_indptr": split.train_indptr,
        "train_items": split.train_items,
        "val_item": split.val_item,
        "test_item": split.test_item,
        "negatives": split.negatives,
    }
    for name, values in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(values, dtype=np.int64))
    meta = {"name": split.name, "n_users": split.n_users, "n_items": split.n_items, "seed": split.seed}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
