"""One entry point for every data source: ``load_dataset("movielens-small")``,
``load_dataset("path/to/ratings.dat")``, ``load_dataset("synthetic:10000x2000")`` or
``load_dataset("fitted:movielens-small:100000")``; :func:`stream_dataset` gives a generated
population in chunks, for populations too large to hold in memory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedpref.simulations.data.fitted import generate_fitted_spec, iter_fitted_spec, parse_fitted
from fedpref.simulations.data.interactions import DataFormatError, Interactions
from fedpref.simulations.data.movielens import BUILTIN, load_movielens_small
from fedpref.simulations.data.synthetic import SyntheticChunk

SYNTHETIC = re.compile(r"^synthetic:(\d+)x(\d+)(?::seed=(\d+))?$")


def describe_sources() -> str:
    return (
        f"a built-in data set ({', '.join(BUILTIN)}), a file path (MovieLens u.data, ratings.dat, "
        "ratings.csv or a CSV with columns user,item[,timestamp][,rating]), "
        "synthetic:USERSxITEMS[:seed=N] or fitted:SOURCE:USERS[:seed=N] (people drawn like SOURCE's)"
    )


def _synthetic_config(source: str, seed: int, rating_threshold: float | None):
    match = SYNTHETIC.match(source)
    if not match:
        return None
    from fedpref.simulations.data.synthetic import SyntheticConfig

    if rating_threshold is not None:
        raise DataFormatError("synthetic populations have no ratings; drop --rating-threshold")
    users, items, syn_seed = match.groups()
    try:
        return SyntheticConfig(n_users=int(users), n_items=int(items), seed=int(syn_seed) if syn_seed else seed)
    except ValueError as exc:
        raise DataFormatError(f"{source}: {exc}") from exc


def _fitted_spec(source: str, seed: int, rating_threshold: float | None):
    spec = parse_fitted(source, seed=seed)
    if spec is not None and rating_threshold is not None:
        raise DataFormatError("fitted populations have no ratings; drop --rating-threshold")
    return spec


def load_dataset(
    source: str,
    *,
    format: str | None = None,
    rating_threshold: float | None = None,
    seed: int = 0,
) -> Interactions:
    """Load an interaction table from a built-in name, a file path or a generator's spec."""
    if source == "movielens-small":
        return load_movielens_small(rating_threshold=rating_threshold)
    config = _synthetic_config(source, seed, rating_threshold)
    if config is not None:
        from fedpref.simulations.data.synthetic import generate_synthetic

        return generate_synthetic(config).interactions
    spec = _fitted_spec(source, seed, rating_threshold)
    if spec is not None:
        return generate_fitted_spec(spec)
    path = Path(source)
    if not path.exists():
        raise DataFormatError(f"no data set or file named {source!r}; give {describe_sources()}")
    from fedpref.simulations.data.loaders import load_file

    return load_file(path, format=format, rating_threshold=rating_threshold)


@dataclass(frozen=True)
class StreamedSource:
    """A generated population, drawn chunk by chunk: ``chunks`` yields its people in user order."""

    name: str
    n_users: int
    n_items: int
    seed: int
    chunks: Iterator[SyntheticChunk]
    fingerprint: str | None = None  # what the people depend on beyond name and seed (a fitted generator's fit), if anything


def stream_dataset(source: str, *, seed: int = 0, chunk_users: int = 4096, progress: bool = False) -> StreamedSource | None:
    """A generator's population (``synthetic:`` or ``fitted:``) as a stream of chunks, or None for a
    source that is read whole (a built-in data set or a file: use :func:`load_dataset`)."""
    config = _synthetic_config(source, seed, None)
    if config is not None:
        from fedpref.simulations.data.synthetic import iter_synthetic

        return StreamedSource(config.name, config.n_users, config.n_items, config.seed, iter_synthetic(config, chunk_users=chunk_users))
    spec = _fitted_spec(source, seed, None)
    if spec is not None:
        n_items, name, fingerprint, chunks = iter_fitted_spec(spec, chunk_users=chunk_users, progress=progress)
        return StreamedSource(name, spec.n_users, n_items, spec.seed, chunks, fingerprint)
    return None
