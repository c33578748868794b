"""Populations fitted to a real data set: ``fitted:SOURCE:N[:seed=S]``.

A generator learns the item side and the distribution of people's tastes and activity from a
real interaction table (by default the built-in ``movielens-small``), then draws any number of
new people, streamed in chunks like :func:`fedpref.simulations.data.synthetic.iter_synthetic`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from fedpref.simulations.data.interactions import DataFormatError, Interactions
from fedpref.simulations.data.synthetic import SyntheticChunk

FITTED = re.compile(r"^fitted:(.+):(\d+)(?::seed=(\d+))?$")


@dataclass(frozen=True)
class FittedSpec:
    """A parsed ``fitted:SOURCE:N[:seed=S]``: draw ``n_users`` people like those of ``source``."""

    source: str
    n_users: int
    seed: int


def parse_fitted(spec: str, *, seed: int = 0) -> FittedSpec | None:
    """The spec named by ``spec``, or None when it is not a ``fitted:`` name. The source is
    everything between ``fitted:`` and the last ``:N`` (a file path may hold colons)."""
    match = FITTED.match(spec)
    if not match:
        return None
    source, n_users, spec_seed = match.groups()
    if source.startswith(("fitted:", "synthetic:")):
        raise DataFormatError(f"{spec}: a fitted population is fitted to real data, not to {source!r}")
    if int(n_users) < 1:
        raise DataFormatError(f"{spec}: a population needs at least one person")
    return FittedSpec(source=source, n_users=int(n_users), seed=int(spec_seed) if spec_seed else seed)


def iter_fitted_spec(spec: FittedSpec, *, chunk_users: int = 4096, progress: bool = False) -> tuple[int, str, Iterator[SyntheticChunk]]:
    """``(n_items, name, chunks)``: the catalogue size, the population's name and its people in
    user order, fitting (or loading the cached fit of) the generator first."""
    raise NotImplementedError("the fitted generator is not written yet")


def generate_fitted_spec(spec: FittedSpec, *, progress: bool = False) -> Interactions:
    """The whole drawn population as one interaction table (for populations that fit in memory)."""
    raise NotImplementedError("the fitted generator is not written yet")
