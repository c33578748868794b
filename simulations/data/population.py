"""Hand every user's history to one virtual device: write a split as a population folder.

The folder is what ``fedpref.simulations.engines.history`` reads (each device its own row, memory-mapped),
and what the server reads the catalogue size from (``meta.json``). Its files:

- ``train_indptr.npy`` (n_users + 1), ``train_items.npy``: every device's training items in time
  order, in CSR form;
- ``val_item.npy``, ``test_item.npy`` (n_users each): the two held-out items;
- ``negatives.npy`` (n_users, 99): the fixed sampled negatives;
- ``meta.json``: ``name``, ``n_users``, ``n_items``, ``seed``, ``format`` and, for a generated
  population, the ``source`` it was drawn from. It is written last: a folder without it is not
  a population (an interrupted write leaves ``writing.json`` instead).

All arrays are int64 NumPy files. :func:`write_population` writes a split held in memory;
:func:`write_population_stream` writes a generated population chunk by chunk, for populations
far larger than memory (ten million people); :func:`read_population` reads a folder back,
memory-mapped and checked.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpref.models.files import open_private, private_folder, write_private

from fedpref.simulations.data.split import MIN_INTERACTIONS, LeaveOneOutSplit, sample_eval_negatives

if TYPE_CHECKING:
    from fedpref.simulations.data.registry import StreamedSource
    from fedpref.simulations.evaluate import RankingMetrics

#: The folder layout's identifier, written to meta.json; a reader refuses other formats.
FORMAT = "fedpref-population/1"
ARRAYS = ("train_indptr", "train_items", "val_item", "test_item", "negatives")
#: Written first and removed last by :func:`write_population_stream`: a folder holding it and no
#: meta.json is an interrupted write.
WRITING = "writing.json"
#: Users per split block of :func:`write_population_stream`. Part of the seeding contract: block
#: ``b`` (users ``b * SPLIT_BLOCK ..``) draws its negatives from ``SeedSequence(seed, spawn_key=(2, b))``.
SPLIT_BLOCK = 4096
#: Bytes reserved for a streamed array's .npy header (a multiple of 64, room for any shape).
_HEADER_BYTES = 128


class PopulationError(ValueError):
    """A folder is not a readable population (or not the one asked for)."""


def write_population(split: LeaveOneOutSplit, folder: str | Path) -> Path:
    """Write ``split`` to ``folder``: every person's history, so readable by its owner only
    (files 0600; the folder, if this creates it, 0700). meta.json goes last (an old one is
    removed first), so a half-written folder is never taken for a finished one."""
    folder = private_folder(folder)
    (folder / "meta.json").unlink(missing_ok=True)
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
    meta = {"name": split.name, "n_users": split.n_users, "n_items": split.n_items, "seed": split.seed,
            "format": FORMAT, "dropped_users": int(split.dropped_users)}
    write_private(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return folder


def read_meta(folder: str | Path) -> dict:
    """A population folder's ``meta.json`` (``n_users``, ``n_items``, ``name``, ``seed``)."""
    meta = Path(folder) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"no population in {folder} (meta.json missing): write one with `fedpref population --dataset NAME --out {folder}`")
    return json.loads(meta.read_text())


# ---------------------------------------------------------------------------------------------
# Streamed writing
# ---------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header for a C-ordered little-endian int64 array of ``shape``, padded
    with spaces to exactly ``_HEADER_BYTES`` (the format allows any padding before the newline)."""
    text = "{'descr': '<i8', 'fortran_order': False, 'shape': %r, }" % (tuple(int(n) for n in shape),)
    pad = _HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise PopulationError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + (text + " " * pad + "\n").encode("latin1")


class _Appender:
    """An int64 .npy file written row block by row block; its header, reserved at the start,
    gets the final shape on :meth:`close`."""

    def __init__(self, path: Path, tail: tuple[int, ...] = ()) -> None:
        self.tail, self.rows = tail, 0
        self.file = open_private(path)
        self.file.write(_npy_header((0, *tail)))

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype="<i8")
        assert values.shape[1:] == self.tail
        self.file.write(memoryview(values).cast("B"))
        self.rows += len(values)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.tail)))
        self.file.close()


@dataclass(frozen=True)
class _SplitBlock:
    train_counts: np.ndarray
    train_items: np.ndarray
    val_item: np.ndarray
    test_item: np.ndarray
    negatives: np.ndarray
    dropped: int


def _time_order(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray | None:
    """The order (user, time, item id) of the rows, or None when they already are in it. A
    generator's rows come grouped by user in time order, so only equal times need sorting."""
    if len(user) < 2:
        return None
    same = user[1:] == user[:-1]
    step = timestamp[1:] - timestamp[:-1]
    if np.any(user[1:] < user[:-1]) or np.any(same & (step < 0)):
        return np.lexsort((item, timestamp, user))
    tie = same & (step == 0)
    if not tie.any():
        return None
    run = np.concatenate([[0], np.cumsum(~tie)])  # rows of one user at one second share a run
    return np.argsort(run * n_items + item, kind="stable")


def split_block(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, n_block: int, n_items: int,
                n_negatives: int, rng: np.random.Generator, *, name: str = "population") -> _SplitBlock:
    """The evaluation protocol's split of one block of people (``user`` is 0..n_block-1): ordered by
    time (ties by item id, as :func:`~fedpref.simulations.data.split.leave_one_out`), the last
    event is the test item, the one before validation, the rest training; people with fewer than
    3 events are dropped. Negatives come from ``rng``."""
    counts = np.bincount(user, minlength=n_block)
    keep = counts >= MIN_INTERACTIONS
    rows = keep[user]
    new_index = np.cumsum(keep) - 1
    user, item, timestamp = new_index[user[rows]], item[rows], timestamp[rows]
    order = _time_order(user, timestamp, item, n_items)
    if order is not None:
        user, item = user[order], item[order]
    kept = counts[keep]
    ends = np.cumsum(kept)
    train_mask = np.ones(len(item), dtype=bool)
    train_mask[ends - 1] = False
    train_mask[ends - 2] = False
    negatives = sample_eval_negatives(user, item, len(kept), n_items, n_negatives, rng, name=name) if len(kept) else np.empty((0, n_negatives), np.int64)
    return _SplitBlock(kept - 2, item[train_mask], item[ends - 2], item[ends - 1], negatives, int((~keep).sum()))


def write_population_stream(source: StreamedSource, folder: str | Path, *, n_negatives: int = 99, progress: bool = False,
                            describe: dict | None = None) -> Path:
    """Write a generated population to ``folder`` chunk by chunk, never holding it in memory.

    The folder is the one :func:`write_population` writes, for the split
    :func:`~fedpref.simulations.data.split.leave_one_out` would make: per person, the latest event
    is the test item, the one before it the validation item, the rest training (ties in time by
    item id); people with fewer than 3 events are dropped and counted in meta.json. The people
    are split in fixed blocks of :data:`SPLIT_BLOCK` users, block ``b`` drawing its negatives
    from ``SeedSequence(source.seed, spawn_key=(2, b))``, so the folder depends on the source and
    its seed only, not on how the source is chunked. The train, validation and test items are
    those of ``leave_one_out``; the negatives differ (its one generator serves the whole table).

    Memory holds one chunk of the source and one block; arrays are appended to their files,
    whose .npy headers get their shapes at the end. ``writing.json`` marks the folder while it is
    written and meta.json (with ``describe``'s keys added) is written last, so an interrupted
    write is never taken for a population. Files 0600, a new folder 0700.
    """
    from fedpref.simulations.progress import progress_bar

    if isinstance(n_negatives, bool) or not isinstance(n_negatives, (int, np.integer)) or n_negatives < 1:
        raise PopulationError(f"n_negatives must be a positive integer, got {n_negatives!r}")
    if n_negatives > source.n_items - MIN_INTERACTIONS:
        raise PopulationError(f"{source.name}: {n_negatives} negatives do not fit a catalogue of {source.n_items} items")
    folder = private_folder(folder)
    (folder / "meta.json").unlink(missing_ok=True)
    write_private(folder / WRITING, json.dumps({"name": source.name, "seed": source.seed, "pid": os.getpid()}) + "\n")
    files = {name: _Appender(folder / f"{name}.npy", (n_negatives,) if name == "negatives" else ()) for name in ARRAYS}
    files["train_indptr"].append(np.zeros(1, dtype=np.int64))
    offset, dropped, next_start = 0, 0, 0
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def flush(block_start: int, block_stop: int) -> None:
        nonlocal offset, dropped
        if len(pending) == 1:  # views, not copies: a large chunk is cut into blocks in place
            user, item, stamp = pending[0]
        else:
            user, item, stamp = (np.concatenate([p[i] for p in pending]) if pending else np.empty(0, np.int64) for i in range(3))
        cut = int(np.searchsorted(user, block_stop))
        pending.clear()
        if cut < len(user):
            pending.append((user[cut:], item[cut:], stamp[cut:]))
        rng = np.random.default_rng(np.random.SeedSequence(source.seed, spawn_key=(2, block_start // SPLIT_BLOCK)))
        block = split_block(user[:cut] - block_start, item[:cut], stamp[:cut], block_stop - block_start, source.n_items, n_negatives, rng, name=source.name)
        files["train_indptr"].append(offset + np.cumsum(block.train_counts))
        offset += int(block.train_counts.sum())
        files["train_items"].append(block.train_items)
        files["val_item"].append(block.val_item)
        files["test_item"].append(block.test_item)
        files["negatives"].append(block.negatives)
        dropped += block.dropped

    try:
        block_start = 0
        with progress_bar(source.n_users, f"{source.name}: writing", progress) as advance:
            for chunk in source.chunks:
                _check_chunk(chunk, next_start, source)
                next_start = chunk.stop
                if len(chunk.user):
                    pending.append((np.asarray(chunk.user, np.int64), np.asarray(chunk.item, np.int64), np.asarray(chunk.timestamp, np.int64)))
                while chunk.stop >= block_start + SPLIT_BLOCK or (chunk.stop == source.n_users and block_start < source.n_users):
                    block_stop = min(block_start + SPLIT_BLOCK, source.n_users)
                    flush(block_start, block_stop)
                    advance(steps=block_stop - block_start)
                    block_start = block_stop
            if next_start != source.n_users:
                raise PopulationError(f"{source.name}: the source ended after {next_start:,} of {source.n_users:,} people")
    finally:
        for f in files.values():
            f.close()
    n_users = files["val_item"].rows
    if n_users == 0:
        raise PopulationError(f"{source.name}: no person has {MIN_INTERACTIONS} or more events; nothing to write")
    meta = {"name": source.name, "n_users": n_users, "n_items": source.n_items, "seed": source.seed, "format": FORMAT,
            "dropped_users": dropped, "n_train": offset, "n_negatives": n_negatives, **(describe or {})}
    fingerprint = source.fingerprint
    if fingerprint is not None:
        meta["fingerprint"] = str(fingerprint)
    write_private(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    (folder / WRITING).unlink(missing_ok=True)
    return folder


def _check_chunk(chunk, expected_start: int, source: StreamedSource) -> None:
    """A chunk continues the population where the last one stopped, its rows grouped by user."""
    if chunk.start != expected_start or not chunk.start <= chunk.stop <= source.n_users:
        raise PopulationError(f"{source.name}: a chunk holds people {chunk.start}..{chunk.stop}, expected to start at {expected_start} (of {source.n_users})")
    user, item = np.asarray(chunk.user), np.asarray(chunk.item)
    if not (len(user) == len(item) == len(chunk.timestamp)):
        raise PopulationError(f"{source.name}: a chunk's user, item and timestamp columns differ in length")
    if len(user) and (user[0] < chunk.start or user[-1] >= chunk.stop or np.any(np.diff(user) < 0)):
        raise PopulationError(f"{source.name}: a chunk's rows are not grouped by person in order")
    if len(item) and (item.min() < 0 or item.max() >= source.n_items):
        raise PopulationError(f"{source.name}: an item index lies outside the catalogue of {source.n_items}")


def population_state(folder: str | Path, expected: dict | None = None) -> str:
    """What ``folder`` holds, before writing a population there:

    - ``"empty"``: nothing (or it does not exist);
    - ``"same"``: a finished population whose meta.json agrees with ``expected`` on every key
      of ``expected`` (never when ``expected`` is None);
    - ``"population"``: another finished population (or one of an older format);
    - ``"unfinished"``: an interrupted streamed write (``writing.json``, no meta.json);
    - ``"foreign"``: anything else, which no writer may touch.
    """
    folder = Path(folder)
    if not folder.exists():
        return "empty"
    if not folder.is_dir():
        return "foreign"
    names = {p.name for p in folder.iterdir()}
    if not names:
        return "empty"
    ours = {f"{a}.npy" for a in ARRAYS} | {"meta.json", WRITING}
    if "meta.json" in names:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return "foreign"
        if not isinstance(meta, dict) or not {"n_users", "n_items"} <= meta.keys() or not names <= ours:
            return "foreign"
        if expected is not None and all(meta.get(k) == v for k, v in expected.items()) and names >= {f"{a}.npy" for a in ARRAYS}:
            return "same"
        return "population"
    if WRITING in names and names <= ours:
        return "unfinished"
    return "foreign"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _whole(value, name: str, folder, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PopulationError(f"{folder}/meta.json: {name} must be a whole number of at least {low}, got {value!r}; rewrite the folder with `fedpref population`")
    return value


def _check_range(values: np.ndarray, low: int, high: int, what: str, *, step: int = 1 << 24) -> None:
    """Every entry in [low, high), read in slices (the array may be larger than memory)."""
    flat = values.reshape(-1)
    for lo in range(0, len(flat), step):
        part = np.asarray(flat[lo : lo + step])
        if part.min() < low or part.max() >= high:
            raise PopulationError(f"{what} holds {int(part.min()) if part.min() < low else int(part.max())}, outside [{low}, {high}); rewrite the folder with `fedpref population`")


def read_population(folder: str | Path, *, mmap: bool = True) -> LeaveOneOutSplit:
    """A population folder as a :class:`LeaveOneOutSplit`, memory-mapped (``mmap=False``: read into
    memory). The folder is checked as hostile input: meta.json's fields, every array's dtype
    (integer) and shape, and every index in range (CSR pointers from 0, non-decreasing, ending at
    the number of training events; items inside the catalogue); no pickle is ever loaded."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except FileNotFoundError as exc:
        raise PopulationError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise PopulationError(f"{folder}/meta.json is not readable JSON ({exc}); rewrite the folder with `fedpref population`") from exc
    if not isinstance(meta, dict):
        raise PopulationError(f"{folder}/meta.json must hold a JSON object; rewrite the folder with `fedpref population`")
    if meta.get("format", FORMAT) != FORMAT:
        raise PopulationError(f"{folder} holds population format {meta.get('format')!r}; this version reads {FORMAT!r}: rewrite it with `fedpref population`")
    n_users = _whole(meta.get("n_users"), "n_users", folder, low=1)
    n_items = _whole(meta.get("n_items"), "n_items", folder, low=1)
    seed = _whole(meta.get("seed", 0), "seed", folder, low=0)
    dropped = _whole(meta.get("dropped_users", 0), "dropped_users", folder, low=0)
    name = meta.get("name", folder.name)
    if not isinstance(name, str):
        raise PopulationError(f"{folder}/meta.json: name must be a string, got {name!r}")
    arrays = {}
    for key in ARRAYS:
        path = folder / f"{key}.npy"
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise PopulationError(f"{path} is not a readable NumPy array ({exc}); rewrite the folder with `fedpref population`") from exc
        if array.dtype.kind not in "iu" or array.dtype.itemsize > 8:
            raise PopulationError(f"{path} holds {array.dtype}, expected integers; rewrite the folder with `fedpref population`")
        arrays[key] = array
    shapes = {"train_indptr": (n_users + 1,), "val_item": (n_users,), "test_item": (n_users,)}
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise PopulationError(f"{folder}/{key}.npy has shape {arrays[key].shape}, expected {shape} for {n_users:,} users")
    neg, train = arrays["negatives"], arrays["train_items"]
    if neg.ndim != 2 or neg.shape[0] != n_users or neg.shape[1] < 1:
        raise PopulationError(f"{folder}/negatives.npy has shape {neg.shape}, expected ({n_users}, k) with k >= 1")
    if train.ndim != 1:
        raise PopulationError(f"{folder}/train_items.npy has shape {train.shape}, expected one dimension")
    indptr = arrays["train_indptr"]
    if int(indptr[0]) != 0 or int(indptr[-1]) != len(train):
        raise PopulationError(f"{folder}/train_indptr.npy must run from 0 to {len(train):,} (the training events), got {int(indptr[0])}..{int(indptr[-1])}")
    for lo in range(0, n_users, 1 << 22):
        part = np.asarray(indptr[lo : lo + (1 << 22) + 1])
        if np.any(np.diff(part) < 0):
            raise PopulationError(f"{folder}/train_indptr.npy decreases: it is not a CSR pointer; rewrite the folder with `fedpref population`")
    for key in ("train_items", "val_item", "test_item", "negatives"):
        if arrays[key].size:
            _check_range(arrays[key], 0, n_items, f"{folder}/{key}.npy")
    return LeaveOneOutSplit(
        name=name, n_users=n_users, n_items=n_items, train_indptr=indptr, train_items=train,
        val_item=arrays["val_item"], test_item=arrays["test_item"], negatives=neg,
        user_ids=np.arange(n_users, dtype=np.int64), item_ids=np.arange(n_items, dtype=np.int64),
        dropped_users=dropped, seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# The popularity baseline on a folder
# ---------------------------------------------------------------------------------------------


def train_counts(split: LeaveOneOutSplit, *, step: int = 1 << 24) -> np.ndarray:
    """Training events per item, read in slices."""
    counts = np.zeros(split.n_items, dtype=np.int64)
    for lo in range(0, len(split.train_items), step):
        counts += np.bincount(np.asarray(split.train_items[lo : lo + step]), minlength=split.n_items)
    return counts


def popularity_metrics(population: str | Path | LeaveOneOutSplit, *, target: str = "test", k: int = 10, full: bool = True,
                       seed: int = 0, user_batch: int = 1024) -> RankingMetrics:
    """HR@k and NDCG@k of the popularity baseline (every device is recommended the items most
    devices trained on), sampled (target against its 99 negatives) and, with ``full``, against
    every item the device has not trained on, from a population folder (or a split).

    Equal to ``evaluate(popularity_scorer(split), split, ...)`` rank for rank (same tie-breaking
    draws), but never builds a users x items matrix: a full rank is the number of items more
    popular than the target, less those the device trained on, counted per batch of devices.
    """
    from fedpref.models.metrics import hit_rate, ndcg, rank_of_target
    from fedpref.simulations.evaluate import RankingMetrics

    split = population if isinstance(population, LeaveOneOutSplit) else read_population(population)
    targets = split.target(target)
    counts = train_counts(split).astype(np.float64)
    ordered = np.sort(counts)
    rng = np.random.default_rng([seed, 0 if target == "val" else 1])  # the draws evaluate() makes
    sampled = np.empty(split.n_users, dtype=np.int64)
    ranks_full = np.empty(split.n_users, dtype=np.int64)
    for lo in range(0, split.n_users, user_batch):
        hi = min(lo + user_batch, split.n_users)
        t = np.asarray(targets[lo:hi], dtype=np.int64)
        c_t = counts[t]
        sampled[lo:hi] = rank_of_target(c_t, counts[np.asarray(split.negatives[lo:hi], dtype=np.int64)], rng)
        if not full:
            continue
        ptr = np.asarray(split.train_indptr[lo : hi + 1], dtype=np.int64)
        items = np.asarray(split.train_items[ptr[0] : ptr[-1]], dtype=np.int64)
        row = np.repeat(np.arange(hi - lo), np.diff(ptr))
        keys = np.sort(row * split.n_items + items)
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # a device's distinct training items
        row, items = keys // split.n_items, keys % split.n_items
        mine = items != t[row]  # the target is excluded once, as itself
        c_i = counts[items]
        above = np.searchsorted(ordered, c_t, side="right")
        above = len(ordered) - above - np.bincount(row, weights=c_i > c_t[row], minlength=hi - lo).astype(np.int64)
        ties = np.searchsorted(ordered, c_t, side="right") - np.searchsorted(ordered, c_t, side="left") - 1
        ties = ties - np.bincount(row, weights=(c_i == c_t[row]) & mine, minlength=hi - lo).astype(np.int64)
        ranks_full[lo:hi] = above + np.floor(rng.random(hi - lo) * (ties + 1)).astype(np.int64)
    return RankingMetrics(target=target, k=k, n_users=split.n_users, hr=hit_rate(sampled, k), ndcg=ndcg(sampled, k),
                          full_hr=hit_rate(ranks_full, k) if full else float("nan"),
                          full_ndcg=ndcg(ranks_full, k) if full else float("nan"))


def popularity_hr(folder: str | Path, *, k: int = 10, seed: int = 0) -> float:
    """Test HR@k on the sampled candidates of recommending every device the items most devices
    trained on (the popularity baseline), from a population folder alone."""
    return popularity_metrics(folder, k=k, seed=seed, full=False).hr


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
