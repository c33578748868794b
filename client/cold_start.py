"""Recommendations for a device with no history: the items most popular in the published DP
histogram (``popularity.json``, written by the server's popularity round; see
``fedpref.server.analytics``). The histogram is already noised and accounted on the server's
side; reading and ranking it is post-processing and costs no privacy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class PopularityFileError(ValueError):
    """The published popularity file is missing or is not a histogram."""


def load_popularity(path: str | Path) -> np.ndarray:
    """The published (noised) count of every item."""
    path = Path(path)
    if not path.exists():
        raise PopularityFileError(f"no published popularity at {path}: run the server with popularity-histogram=true (and secagg=true)")
    try:
        counts = np.asarray(json.loads(path.read_text())["counts"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise PopularityFileError(f"{path} is not a popularity histogram (a JSON object with 'counts'): {exc}") from None
    if counts.ndim != 1 or not np.isfinite(counts).all():
        raise PopularityFileError(f"{path}: 'counts' must be one finite number per item")
    return counts


def popular_items(counts: np.ndarray, k: int, seen: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` items with the highest counts, best first, leaving out ``seen`` ones."""
    scores = np.asarray(counts, dtype=np.float64).copy()
    if seen is not None and len(seen):
        scores[np.asarray(seen, dtype=np.int64)] = -np.inf
    k = max(0, min(k, int(np.isfinite(scores).sum())))
    order = np.argsort(-scores, kind="stable")
    return order[:k]
