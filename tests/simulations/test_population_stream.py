"""The streamed population writer, the folder reader and the popularity baseline on a folder.

A generated population is written chunk by chunk in fixed split blocks: the folder depends on
the source and its seed, never on the chunking; its train, validation and test items are the
leave-one-out split's; an interrupted write is never taken for a population; a folder is read
back as hostile input; ``fedpref population`` reuses a folder that already holds the population.
"""

import json
import stat
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.simulations.cli import app
from fedpref.simulations.data import population as pop
from fedpref.simulations.data.interactions import Interactions
from fedpref.simulations.data.population import (
    ARRAYS,
    PopulationError,
    popularity_metrics,
    population_state,
    read_population,
    write_population,
    write_population_stream,
)
from fedpref.simulations.data.registry import StreamedSource, load_dataset, stream_dataset
from fedpref.simulations.data.split import leave_one_out
from fedpref.simulations.data.synthetic import SyntheticChunk
from fedpref.simulations.evaluate import evaluate, popularity_scorer

SOURCE = "synthetic:700x300"
runner = CliRunner()


@pytest.fixture()
def small_blocks(monkeypatch):
    """Split blocks of 100 people, so that a 700-person population spans seven of them."""
    monkeypatch.setattr(pop, "SPLIT_BLOCK", 100)


def arrays(folder) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in ARRAYS}


def test_the_folder_does_not_depend_on_the_chunk_size(tmp_path, small_blocks):
    folders = [write_population_stream(stream_dataset(SOURCE, seed=5, chunk_users=c), tmp_path / f"c{c}") for c in (1, 37, 100, 5000)]
    first = arrays(folders[0])
    for folder in folders[1:]:
        for name, values in arrays(folder).items():
            assert np.array_equal(values, first[name]), (folder.name, name)
    assert json.loads((folders[0] / "meta.json").read_text())["seed"] == 5


def test_train_validation_and_test_items_are_the_leave_one_out_split(tmp_path, small_blocks):
    folder = write_population_stream(stream_dataset(SOURCE, seed=2, chunk_users=64), tmp_path / "streamed")
    expected = leave_one_out(load_dataset(SOURCE, seed=2), seed=2)
    split = read_population(folder)
    assert split.n_users == expected.n_users == 700 and split.n_items == 300
    for name in ("train_indptr", "train_items", "val_item", "test_item"):
        assert np.array_equal(getattr(split, name), getattr(expected, name)), name
    # The negatives come from per-block generators (not leave_one_out's one): each is still an
    # item the person never touched, without repeats.
    for u in range(split.n_users):
        touched = set(split.user_train_items(u).tolist()) | {int(split.val_item[u]), int(split.test_item[u])}
        negatives = split.negatives[u].tolist()
        assert len(set(negatives)) == 99 and not touched & set(negatives)


def chunks_of(rows: list[tuple[int, int, int]], n_users: int, cut: int):
    """SyntheticChunks of ``cut`` people from (user, item, time) rows sorted by user."""
    rows = np.array(rows, dtype=np.int64).reshape(-1, 3)
    for start in range(0, n_users, cut):
        stop = min(start + cut, n_users)
        mine = rows[(rows[:, 0] >= start) & (rows[:, 0] < stop)]
        yield SyntheticChunk(start, stop, np.zeros((stop - start, 1), np.float32), np.zeros(stop - start, np.int64), mine[:, 0], mine[:, 1], mine[:, 2])


def test_short_histories_are_dropped_and_equal_times_are_ordered_by_item(tmp_path, monkeypatch):
    monkeypatch.setattr(pop, "SPLIT_BLOCK", 2)
    # Person 1 has two events and person 3 none: both dropped. Person 0's last two events share a
    # second, and so do person 2's (whose rows are not even in time order): the larger item id is
    # the test item, as leave_one_out orders them.
    rows = [(0, 5, 1), (0, 6, 2), (0, 8, 4), (0, 7, 4), (1, 1, 1), (1, 2, 2), (2, 9, 5), (2, 4, 5), (2, 3, 1), (4, 0, 1), (4, 1, 2), (4, 2, 3)]
    rows.sort(key=lambda r: r[0])
    folder = write_population_stream(StreamedSource("handmade", 5, 120, 0, chunks_of(rows, 5, 3)), tmp_path / "p", n_negatives=5)
    split = read_population(folder)
    assert split.n_users == 3 and split.dropped_users == 2
    assert split.test_item.tolist() == [8, 9, 2] and split.val_item.tolist() == [7, 4, 1]
    assert split.train_indptr.tolist() == [0, 2, 3, 4] and split.train_items.tolist() == [5, 6, 3, 0]
    r = np.array(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = Interactions(r[:, 0], r[:, 1], r[:, 2], None, np.arange(5), np.arange(120), name="handmade")
        expected = leave_one_out(table, n_negatives=5)
    assert np.array_equal(split.train_items, expected.train_items) and np.array_equal(split.test_item, expected.test_item)


def failing(source: StreamedSource, after: int) -> StreamedSource:
    def chunks():
        for i, chunk in enumerate(source.chunks):
            if i == after:
                raise RuntimeError("the machine went away")
            yield chunk

    return StreamedSource(source.name, source.n_users, source.n_items, source.seed, chunks())


def test_an_interrupted_write_is_never_taken_for_a_population(tmp_path):
    folder = tmp_path / "p"
    write_population_stream(stream_dataset(SOURCE, seed=0, chunk_users=100), folder)
    assert population_state(folder, {"name": "synthetic-700x300", "seed": 0}) == "same"
    with pytest.raises(RuntimeError, match="went away"):
        write_population_stream(failing(stream_dataset(SOURCE, seed=0, chunk_users=100), after=3), folder)
    assert not (folder / "meta.json").exists() and (folder / "writing.json").exists()
    assert population_state(folder, {"name": "synthetic-700x300", "seed": 0}) == "unfinished"
    with pytest.raises(PopulationError, match="meta.json missing"):
        read_population(folder)


def test_files_are_the_owners_only(tmp_path):
    folder = write_population_stream(stream_dataset(SOURCE, seed=0), tmp_path / "new" / "p")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {p.name: 0o600 for p in folder.iterdir()}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(f"{a}.npy" for a in ARRAYS), "meta.json"])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = leave_one_out(load_dataset("synthetic:300x300", seed=1), seed=1)
    return split, write_population(split, tmp_path_factory.mktemp("pop") / "p")


def spoil(folder, tmp_path, name, value):
    """A copy of ``folder`` with array ``name`` (or meta.json) replaced by ``value``."""
    import shutil

    copy = tmp_path / "spoilt"
    shutil.copytree(folder, copy)
    if name == "meta":
        (copy / "meta.json").write_text(value)
    else:
        np.save(copy / f"{name}.npy", value, allow_pickle=True)
    return copy


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("meta", lambda s: "[1, 2]", "JSON object"),
        ("meta", lambda s: "{not json", "not readable JSON"),
        ("meta", lambda s: json.dumps({"n_users": -3, "n_items": 300}), "n_users must be a whole number"),
        ("meta", lambda s: json.dumps({"n_users": 300, "n_items": 300, "format": "other/9"}), "format"),
        ("val_item", lambda s: s.val_item[:-1], "shape"),
        ("val_item", lambda s: s.val_item.astype(np.float64), "expected integers"),
        ("test_item", lambda s: np.where(np.arange(s.n_users) == 7, s.n_items, s.test_item), "outside"),
        ("negatives", lambda s: -s.negatives, "outside"),
        ("negatives", lambda s: s.negatives[:, 0], "shape"),
        ("train_items", lambda s: np.array([{"a": 1}] * s.n_train, dtype=object), "not a readable NumPy array"),
        ("train_indptr", lambda s: s.train_indptr[::-1].copy(), "must run from 0"),
        ("train_indptr", lambda s: np.concatenate([[0, 5, 3], s.train_indptr[3:]]), "decreases"),
    ],
)
def test_a_hostile_folder_is_refused_with_a_reason(written, tmp_path, name, make, message):
    split, folder = written
    with pytest.raises(PopulationError, match=message):
        read_population(spoil(folder, tmp_path, name, make(split)))


def test_a_written_folder_reads_back_memory_mapped(written):
    split, folder = written
    back = read_population(folder)
    assert isinstance(back.train_items, np.memmap)
    assert back.n_users == split.n_users and np.array_equal(back.negatives, split.negatives)


def test_popularity_on_a_folder_ranks_as_evaluate_does(written):
    split, folder = written
    for target in ("val", "test"):
        mine = popularity_metrics(folder, target=target, seed=3)
        theirs = evaluate(popularity_scorer(split), split, target=target, full=True, seed=3)
        assert mine == theirs
    assert pop.popularity_hr(folder, seed=3) == evaluate(popularity_scorer(split), split, target="test", full=False, seed=3).hr


def invoke(*args):
    return runner.invoke(app, ["population", *args, "--no-progress"], terminal_width=200)


def test_population_command_caches_a_generated_population(tmp_path):
    out = tmp_path / "p"
    first = invoke("--dataset", SOURCE, "--out", str(out), "--seed", "1")
    assert first.exit_code == 0, first.output
    assert "wrote 700 device histories" in first.output
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["source"], meta["seed"], meta["format"]) == (SOURCE, 1, pop.FORMAT)
    stamp = (out / "train_items.npy").stat().st_mtime_ns
    again = invoke("--dataset", SOURCE, "--out", str(out), "--seed", "1")
    assert again.exit_code == 0 and "cached" in again.output
    assert (out / "train_items.npy").stat().st_mtime_ns == stamp
    other = invoke("--dataset", SOURCE, "--out", str(out), "--seed", "2")
    assert other.exit_code == 2 and "another population" in other.output and "--rerun" in other.output
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    rerun = invoke("--dataset", SOURCE, "--out", str(out), "--seed", "2", "--rerun")
    assert rerun.exit_code == 0 and json.loads((out / "meta.json").read_text())["seed"] == 2


def test_population_command_refuses_a_folder_of_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for args in (["--dataset", SOURCE], ["--dataset", SOURCE, "--rerun"]):
        result = invoke(*args, "--out", str(out))
        assert result.exit_code == 2 and "not a population" in result.output
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "precious"


def test_population_command_defaults_to_a_folder_named_after_the_population(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, folder in ((["--dataset", "synthetic:50x300:seed=4"], "synthetic-50x300-seed4"), (["--dataset", "synthetic:50x300"], "synthetic-50x300")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "results/populations" / folder / "meta.json").exists()
