"""Checkpoint and resume: after every round the server keeps everything it needs to go on.

At the start of each round (so after the previous round's training and evaluation), the
ServerApp writes ``<checkpoint-dir>/checkpoint.npz`` atomically (a temporary file, then
``os.replace``): the global arrays, the strategy's state (FedAdam/FedYogi moments, FedAvgM
momentum, the DP wrapper's clipping bound), the privacy ledger, the rounds so far, the best
round, the popularity histogram, the run store's run id and the cohort sampler's count of the training rounds
each device was asked to join (run-config ``dp-max-participations``). A run whose randomness follows
its seed adds the cohort sampler's state and, with ``reproducible-noise``, the DP noise
generator's; a run whose noise and cohorts come from the operating system stores neither
(whoever read them could predict the noise and cohorts to come), and draws afresh when it
resumes. A grid that plays devices in-process (``simulations.engines.inprocess``, ``simulations.engines.fast``)
adds their states, so that a resumed simulation computes exactly what an uninterrupted one would.

The file is a NumPy ``.npz`` archive read with ``allow_pickle=False``: its arrays, and one
entry, ``state``, the JSON text of everything else (devices' Flower records as Flower's
protobuf bytes). Nothing in it can run code when it is read; a file that does not parse is
refused with the reason. It is created 0600 in a folder created 0700: it holds the server's
state, and whoever can write it controls a resumed run.

A server started again with the same config and checkpoint folder resumes from the last
completed round (run-config ``resume``, on by default); a different config is refused rather
than mixed. The pickled ``checkpoint.pkl`` of older fedpref versions is never read.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from fedpref.models.config import RUN_CONFIG_DEFAULTS

from fedpref.models.files import private_folder, replace_private
from .privacy import PrivacyConfigError, PrivacyLedger

CHECKPOINT_FILE = "checkpoint.npz"
PICKLED_FILE = "checkpoint.pkl"  # older fedpref versions' checkpoint (a pickle: never read)
STATE = "state"  # the archive's entry holding the JSON state
FORMAT = 2
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
    strategy: dict = field(default_factory=dict)  # m_t, v_t (name -> ndarray), momentum_vector (list), dp-clipping-norm
    sampler: tuple | None = None  # random.Random state of a seeded cohort sampler (None: drawn from the OS)
    noise: dict | None = None  # the reproducible DP noise generator's state (None: noise from the OS)
    ledger: PrivacyLedger | None = None
    rounds: dict = field(default_factory=dict)  # round -> its row
    best: dict = field(default_factory=dict)  # {"round": int, "arrays": name -> ndarray, or None}
    popularity: tuple | None = None  # (its record, the noised counts)
    secure_rounds: dict = field(default_factory=dict)  # round -> what secure aggregation did
    run_store_id: int | None = None
    devices: object = None  # device states, when the grid plays them
    participation: dict | None = None  # the cohort sampler's count of each device's training rounds ("nodes", "count", "last": arrays)
    format: int = FORMAT


def comparable(run_config: dict) -> dict:
    return {k: v for k, v in run_config.items() if k not in VOLATILE_KEYS}


# -- writing -------------------------------------------------------------------------------


class _Arrays:
    """The arrays of one archive, each under a key of its own ("0", "1", ...)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, value) -> str:
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError("a checkpoint holds numeric arrays only")
        key = str(len(self.arrays))
        self.arrays[key] = array
        return key

    def named(self, arrays: dict | None) -> dict | None:
        return None if arrays is None else {str(name): self.put(value) for name, value in arrays.items()}


def _json_value(value):
    """NumPy scalars as Python's (a round's metrics may hold them)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a checkpoint cannot hold {type(value).__name__}")


def _encode_devices(devices, arrays: _Arrays):
    """Device states: the fast engine's arrays, or the in-process engine's Flower records."""
    if devices is None:
        return None
    from flwr.app import RecordDict

    if all(isinstance(v, RecordDict) for v in devices.values()):
        from flwr.common.serde import recorddict_to_proto

        return {"records": {str(int(node)): arrays.put(np.frombuffer(recorddict_to_proto(state).SerializeToString(), dtype=np.uint8))
                            for node, state in devices.items()}}
    return {"arrays": arrays.named(devices)}


def serialize(checkpoint: Checkpoint) -> bytes:
    """The checkpoint as the bytes of its ``.npz`` archive."""
    arrays = _Arrays()
    strategy = {}
    for name, value in checkpoint.strategy.items():
        if isinstance(value, dict):
            strategy[name] = {"named": arrays.named(value)}
        elif isinstance(value, (list, tuple)):
            strategy[name] = {"list": [arrays.put(v) for v in value]}
        elif value is None or isinstance(value, (int, float)):
            strategy[name] = {"value": value}
        else:
            raise TypeError(f"strategy state {name!r}: a checkpoint cannot hold {type(value).__name__}")
    popularity = None
    if checkpoint.popularity is not None:
        record, counts = checkpoint.popularity
        popularity = {"record": record, "counts": arrays.put(counts)}
    sampler = None
    if checkpoint.sampler is not None:
        version, internal, gauss = checkpoint.sampler
        sampler = {"version": version, "internal": list(internal), "gauss": gauss}
    state = {
        "format": checkpoint.format,
        "config": checkpoint.config,
        "completed-round": checkpoint.completed_round,
        "finished": checkpoint.finished,
        "arrays": arrays.named(checkpoint.arrays),
        "strategy": strategy,
        "sampler": sampler,
        "noise": checkpoint.noise,
        "ledger": None if checkpoint.ledger is None else checkpoint.ledger.to_dict(),
        "rounds": [checkpoint.rounds[r] for r in sorted(checkpoint.rounds)],
        "best": {"round": checkpoint.best.get("round", 0), "arrays": arrays.named(checkpoint.best.get("arrays"))},
        "popularity": popularity,
        "secure-rounds": {str(r): v for r, v in checkpoint.secure_rounds.items()},
        "run-store-id": checkpoint.run_store_id,
        "devices": _encode_devices(checkpoint.devices, arrays),
        "participation": arrays.named(checkpoint.participation),
    }
    text = json.dumps(state, default=_json_value)
    buffer = io.BytesIO()
    np.savez(buffer, **{STATE: np.frombuffer(text.encode(), dtype=np.uint8)}, **arrays.arrays)
    return buffer.getvalue()


def save(folder: str | Path, checkpoint: Checkpoint) -> Path:
    return _write(folder, serialize(checkpoint))


def _write(folder: str | Path, data: bytes) -> Path:
    target = private_folder(folder) / CHECKPOINT_FILE
    replace_private(target, data)  # atomic: a kill leaves the old checkpoint or the new one
    return target


class Writer:
    """Writes a run's checkpoints, the disk's part in the background: a checkpoint is serialised
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
        data = serialize(checkpoint)
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


# -- reading -------------------------------------------------------------------------------


class _Malformed(ValueError):
    """Something in the archive is not what a checkpoint holds."""


def _expect(value, kind, what: str):
    """``value`` if it is of ``kind`` (a bool is not a number here), else :class:`_Malformed`."""
    if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
        raise _Malformed(f"{what} is not {_KINDS.get(kind, kind)}, got {type(value).__name__}")
    return value


_KINDS = {dict: "a JSON object", list: "a list", int: "an integer", bool: "true or false", (int, float): "a number"}


class _Reader:
    def __init__(self, archive) -> None:
        self.archive = archive

    def get(self, key) -> np.ndarray:
        if not isinstance(key, str) or key == STATE or key not in self.archive.files:
            raise _Malformed(f"it refers to an array {key!r} it does not hold")
        return self.archive[key]

    def named(self, keys, what: str) -> dict | None:
        if keys is None:
            return None
        return {str(name): self.get(key) for name, key in _expect(keys, dict, what).items()}


def _decode_devices(value, reader: _Reader):
    if value is None:
        return None
    _expect(value, dict, "devices")
    if "records" in value:
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        records = {}
        for node, key in _expect(value["records"], dict, "devices").items():
            raw = reader.get(key)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise _Malformed(f"device {node}'s state is not bytes")
            records[int(node)] = recorddict_from_proto(ProtoRecordDict.FromString(raw.tobytes()))
        return records
    return reader.named(value.get("arrays"), "devices")


def _decode(archive) -> Checkpoint:
    if STATE not in archive.files:
        raise _Malformed("it has no state entry")
    raw = archive[STATE]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _Malformed("its state entry is not text")
    state = _expect(json.loads(raw.tobytes().decode("utf-8")), dict, "its state")
    if state.get("format") != FORMAT:
        raise _Malformed(f"it is of format {state.get('format')!r}, not {FORMAT}")
    reader = _Reader(archive)
    strategy = {}
    for name, value in _expect(state.get("strategy", {}), dict, "strategy").items():
        _expect(value, dict, f"strategy state {name!r}")
        if "named" in value:
            strategy[name] = reader.named(value["named"], f"strategy state {name!r}")
        elif "list" in value:
            strategy[name] = [reader.get(k) for k in _expect(value["list"], list, f"strategy state {name!r}")]
        else:
            strategy[name] = value.get("value")
            if strategy[name] is not None:
                _expect(strategy[name], (int, float), f"strategy state {name!r}")
    sampler = state.get("sampler")
    if sampler is not None:
        _expect(sampler, dict, "sampler")
        internal = _expect(sampler.get("internal"), list, "the sampler's state")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in internal):
            raise _Malformed("the sampler's state is not integers")
        gauss = sampler.get("gauss")
        if gauss is not None:
            _expect(gauss, (int, float), "the sampler's gauss")
        sampler = (_expect(sampler.get("version"), int, "the sampler's version"), tuple(internal), gauss)
    noise = state.get("noise")
    if noise is not None:
        _expect(noise, dict, "the noise generator's state")
    ledger = state.get("ledger")
    if ledger is not None:
        try:
            ledger = PrivacyLedger.from_dict(ledger)
        except (PrivacyConfigError, ValueError) as exc:
            raise _Malformed(f"its privacy ledger: {exc}") from None
    rounds = {}
    for row in _expect(state.get("rounds", []), list, "rounds"):
        rounds[_expect(_expect(row, dict, "a round's row").get("round"), int, "a round's number")] = row
    best = _expect(state.get("best", {}), dict, "best")
    popularity = state.get("popularity")
    if popularity is not None:
        _expect(popularity, dict, "popularity")
        popularity = (_expect(popularity.get("record"), dict, "the popularity record"), reader.get(popularity.get("counts")))
    run_store_id = state.get("run-store-id")
    if run_store_id is not None:
        _expect(run_store_id, int, "the run store id")
    arrays = reader.named(state.get("arrays"), "arrays")
    if arrays is None:
        raise _Malformed("it holds no global arrays")
    return Checkpoint(
        config=_expect(state.get("config"), dict, "config"),
        completed_round=_expect(state.get("completed-round"), int, "the completed round"),
        finished=_expect(state.get("finished"), bool, "finished"),
        arrays=arrays,
        strategy=strategy,
        sampler=sampler,
        noise=noise,
        ledger=ledger,
        rounds=rounds,
        best={"round": _expect(best.get("round", 0), int, "the best round"), "arrays": reader.named(best.get("arrays"), "the best arrays")},
        popularity=popularity,
        secure_rounds={int(r): v for r, v in _expect(state.get("secure-rounds", {}), dict, "secure rounds").items()},
        run_store_id=run_store_id,
        devices=_decode_devices(state.get("devices"), reader),
        participation=reader.named(state.get("participation"), "the devices' participations"),
    )


def load(folder: str | Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None if there is none. A file that is not a checkpoint
    of this format is refused (:class:`CheckpointError`), and an older fedpref's pickled
    checkpoint is never opened."""
    folder = Path(folder)
    target = folder / CHECKPOINT_FILE
    if not target.exists():
        if (folder / PICKLED_FILE).exists():
            raise CheckpointError(
                f"{folder / PICKLED_FILE} is a checkpoint of an older fedpref, a Python pickle, which could run code when "
                "read: fedpref does not open it. Start the run afresh (resume=false, or remove the file)."
            )
        return None
    try:
        with np.load(target, allow_pickle=False) as archive:
            return _decode(archive)
    except (_Malformed, ValueError, KeyError, TypeError, OSError, EOFError, RecursionError, zipfile.BadZipFile, DecodeError) as exc:
        raise CheckpointError(
            f"{target} is not a readable fedpref checkpoint ({type(exc).__name__}: {exc}); "
            "remove it, or set resume=false, to start the run again"
        ) from None


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
