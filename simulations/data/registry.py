"""One entry point for every data source: ``load_dataset("movielens-small")``,
``load_dataset("path/to/ratings.dat")`` or ``load_dataset("synthetic:10000x2000")``."""

from __future__ import annotations

import re
from pathlib import Path

from fedpref.simulations.data.interactions import DataFormatError, Interactions
from fedpref.simulations.data.movielens import BUILTIN, load_movielens_small

SYNTHETIC = re.compile(r"^synthetic:(\d+)x(\d+)(?::seed=(\d+))?$")


def describe_sources() -> str:
    return (
        f"a built-in data set ({', '.join(BUILTIN)}), a file path (MovieLens u.data, ratings.dat, "
        "ratings.csv or a CSV with columns user,item[,timestamp][,rating]), or "
        "synthetic:USERSxITEMS[:seed=N]"
    )


def load_dataset(
    source: str,
    *,
    format: str | None = None,
    rating_threshold: float | None = None,
    seed: int = 0,
) -> Interactions:
    """Load an interaction table from a built-in name, a file path or a synthetic spec."""
    if source == "movielens-small":
        return load_movielens_small(rating_threshold=rating_threshold)
    match = SYNTHETIC.match(source)
    if match:
        from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic

        if rating_threshold is not None:
            raise DataFormatError("synthetic populations have no ratings; drop --rating-threshold")
        users, items, syn_seed = match.groups()
        try:
            config = SyntheticConfig(n_users=int(users), n_items=int(items), seed=int(syn_seed) if syn_seed else seed)
        except ValueError as exc:
            raise DataFormatError(f"{source}: {exc}") from exc
        return generate_synthetic(config).interactions
    path = Path(source)
    if not path.exists():
        raise DataFormatError(f"no data set or file named {source!r}; give {describe_sources()}")
    from fedpref.simulations.data.loaders import load_file

    return load_file(path, format=format, rating_threshold=rating_threshold)
