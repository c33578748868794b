"""Checkpoint and resume: after every round the server keeps everything it needs to go on.

At the start of each round (so after the previous round's training and evaluation), the
ServerApp writes ``<checkpoint-dir>/checkpoint.pkl`` atomically (a temporary file, then
``os.replace``): the global arrays, the strategy's state (FedAdam/FedYogi moments, FedAvgM
momentum, the DP wrapper's clipping bound), the privacy ledger, the cohort sampler's and
NumPy's random states, the rounds so far, the best round, the popularity histogram and the
run store's run id. A grid that plays devices in-process (``simulations.inprocess``) adds
their states, so that a resumed simulation computes exactly what an uninterrupted one would.

A server started again with the same config and checkpoint folder resumes from the last
completed round (run-config ``resume``, on by default); a different config is refused rather
than mixed. The file is Python's pickle: keep the folder as private as the server itself.
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fedpref.models.federation import RUN_CONFIG_DEFAULTS

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = 1
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
VOLATILE_KEYS = ("resume", "run-store", "results-dir", "checkpoint-dir", "history-dir", "store-dir")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run."""


@dataclass
class Checkpoint:
    config: dict  # the run config (without VOLATILE_KEYS)
    completed_round: int  # rounds 1..completed_round are done
    finished: bool
    arrays: dict  # name -> ndarray, the global model after completed_round
    strategy: dict = field(default_factory=dict)
    sampler: object = None  # random.Random state of the cohort sampler
    numpy_random: object = None  # np.random global state (the DP noise)
    ledger: object = None
    rounds: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    popularity: object = None
    secure_rounds: dict = field(default_factory=dict)
    run_store_id: int | None = None
    devices: object = None  # device states, when the grid plays them
    format: int = FORMAT


def comparable(run_config: dict) -> dict:
    return {k: v for k, v in run_config.items() if k not in VOLATILE_KEYS}


def save(folder: str | Path, checkpoint: Checkpoint) -> Path:
    return _write(folder, pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL))


def _write(folder: str | Path, data: bytes) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)  # atomic: a kill leaves the old checkpoint or the new one
    return target


class Writer:
    """Writes a run's checkpoints, the disk's part in the background: a checkpoint is pickled
    when :meth:`save` is called (so later changes to the run's objects do not reach it), and
    written and synced while the next round goes on. One write at a time: ``save`` waits for the
    previous one first, and :meth:`wait` (or ``save(..., wait=True)``) for the last. A failed
    write is raised by the next call."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, checkpoint: Checkpoint, *, wait: bool = False) -> None:
        self.wait()
        data = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
        self._thread = threading.Thread(target=self._run, args=(data,), name="fedpref-checkpoint")
        self._thread.start()
        if wait:
            self.wait()

    def _run(self, data: bytes) -> None:
        try:
            _write(self.folder, data)
        except BaseException as exc:  # noqa: BLE001 - handed to the server's thread
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load(folder: str | Path) -> Checkpoint | None:
    target = Path(folder) / CHECKPOINT_FILE
    if not target.exists():
        return None
    try:
        with target.open("rb") as f:
            checkpoint = pickle.load(f)
    except Exception as exc:
        raise CheckpointError(f"{target} cannot be read ({exc}); remove it to start the run again") from None
    if not isinstance(checkpoint, Checkpoint) or checkpoint.format != FORMAT:
        raise CheckpointError(f"{target} is not a fedpref checkpoint of format {FORMAT}; remove it to start the run again")
    return checkpoint


def resumable(folder: str | Path, run_config: dict) -> Checkpoint | None:
    """The unfinished checkpoint of this config in ``folder``, or None (no checkpoint, or the
    last run finished). A checkpoint of another config is an error."""
    checkpoint = load(folder)
    if checkpoint is None or checkpoint.finished:
        return None
    # A key the checkpoint lacks was added to fedpref after it was written: it ran with the default.
    mine = comparable(run_config)
    theirs = {**comparable({k: v for k, v in RUN_CONFIG_DEFAULTS.items() if k not in checkpoint.config}), **checkpoint.config}
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise CheckpointError(
            f"{Path(folder) / CHECKPOINT_FILE} holds an unfinished run with another config (differs in {', '.join(differ)}): "
            "resume it with the same config, use another checkpoint-dir, or set resume=false to start again"
        )
    return checkpoint
