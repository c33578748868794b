"""The update guard: what a device does to an update before it leaves.

An update is the difference between the shared arrays after local training and the global
arrays the device received. Its L2 norm (over all shared arrays taken as one vector) is
scaled down to at most the clipping bound C, as in DP-FedAvg (McMahan et al., 2018).
"""

from __future__ import annotations

import numpy as np

from fedpref.models.contract import Params, shared_norm


def clip_update(update: Params, clip_norm: float) -> tuple[Params, float, bool]:
    """Scale ``update`` to L2 norm at most ``clip_norm``.

    Returns ``(clipped, norm_before, was_clipped)``.
    """
    if not clip_norm > 0:
        raise ValueError(f"The clipping norm should be a positive value, got {clip_norm}.")
    norm = shared_norm(update)
    if norm <= clip_norm:
        return update, norm, False
    scale = clip_norm / norm
    # float32 rounding can leave the scaled norm a hair above C: shave it off.
    scale *= 1.0 - 1e-7
    return {k: (v * scale).astype(v.dtype, copy=False) for k, v in update.items()}, norm, True


def encode_update(shared: Params, update: Params, clip_norm: float) -> tuple[Params, float, bool]:
    """The arrays a device sends: ``shared + clip(update)``, in the shared arrays' dtype.

    Flower's strategies aggregate weights, so the device sends the clipped update added to
    the global arrays it received. Adding in float32 rounds; the norm of what the server can
    recover (``sent - shared``) is checked here and shaved until it is within C.
    Returns ``(sent, norm_before_clipping, was_clipped)``.
    """
    clipped, norm, was_clipped = clip_update(update, clip_norm)
    for _ in range(20):
        sent = {k: (shared[k] + clipped[k]).astype(shared[k].dtype, copy=False) for k in shared}
        recovered = {k: sent[k].astype(np.float64) - shared[k].astype(np.float64) for k in shared}
        actual = shared_norm(recovered)
        if actual <= clip_norm:
            return sent, norm, was_clipped
        factor = clip_norm / actual * (1.0 - 1e-6)
        clipped = {k: (v * factor).astype(v.dtype, copy=False) for k, v in clipped.items()}
        was_clipped = True
    raise FloatingPointError("could not bring the update within the clipping bound; check clip-norm")
