"""A device's round of matrix factorisation with SGD, compiled: the fast engine's local update.

:func:`fedpref.models.train.local_update` trains a device with a small torch model; its
arithmetic takes microseconds, its Python and torch overhead milliseconds. The fast engine
(:mod:`fedpref.simulations.engines.fast`) trains its devices with the compiled functions here instead
(numba, no Python in the loop, the GIL released so that devices train in parallel threads), and
they compute the same thing:

- **The same random choices.** The device's generator is passed in and drawn from in the same
  order and by the same algorithms as ``local_update`` draws (numba's ``Generator`` methods
  reproduce NumPy's streams): the torch seed, then per epoch the permutation and per batch
  ``num_negatives`` uniform negatives, each draw that hits one of the device's own items drawn
  again (at most 20 times), as :func:`~fedpref.models.train.sample_negatives` does. A test
  checks the draws against ``epoch_batches`` and the generator's state afterwards.
- **The same arithmetic, summed in another order.** The sampled softmax (or BPR, or BCE) loss,
  L2 on the rows a batch touches, and plain SGD on the private vector and on the item rows and
  biases the batch touched, every step computed from the values before it, as torch's sparse
  SGD does. Results agree with ``local_update`` to float32 rounding (a test checks each
  device's update to 1e-5, relative), not bit for bit.
- **Sparse by construction.** An update is the rows the device touched and their new values,
  never a dense copy of the item table.

The two phases of a federated round (:func:`fedpref.client.device.local_round`) are one call:
``refit_epochs`` passes on the private vector alone at ``refit_lr``, then ``epochs`` passes on
everything at ``lr``. Supported: model ``mf``, optimizer ``sgd``, losses ``softmax``, ``bpr`` and
``bce``; :func:`unsupported` says why anything else is not (the fast engine then calls
``local_update`` once per device).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LOSS_KINDS = {"softmax": 0, "bpr": 1, "bce": 2}
MAX_TRIES = 20  # sample_negatives' redraws of negatives that hit a positive


def unsupported(model: str, optimizer: str, loss: str) -> str | None:
    """Why the compiled trainer cannot run this configuration, or None when it can."""
    if model != "mf":
        return f"model {model!r}: the compiled trainer covers matrix factorisation (mf) only"
    if optimizer != "sgd":
        return f"optimizer {optimizer!r}: the compiled trainer covers plain SGD only"
    if loss not in LOSS_KINDS:
        return f"loss {loss!r}: the compiled trainer covers {', '.join(LOSS_KINDS)}"
    return None


@numba.njit(cache=True, nogil=True, error_model="numpy")
def draw_batches(rng, items, n_items, epochs, batch_size, num_negatives):  # pragma: no cover - compiled
    """One ``local_update`` call's random choices: the torch seed, then for each epoch its
    permutation and each batch's negatives. Returns ``(blocks, batch_sizes, batch_epochs)``:
    ``blocks`` (positives, 1 + num_negatives), each row a positive followed by its negatives,
    batches one after another."""
    n = items.shape[0]
    positive = np.zeros(n_items, dtype=np.bool_)
    for i in range(n):
        positive[items[i]] = True
    rng.integers(0, 2**31 - 1)  # the torch seed (draw_torch_seed)
    n_batches = (n + batch_size - 1) // batch_size
    width = 1 + num_negatives
    blocks = np.empty((n * epochs, width), dtype=np.int64)
    sizes = np.empty(n_batches * epochs, dtype=np.int64)
    batch_epochs = np.empty(n_batches * epochs, dtype=np.int64)
    row = 0
    b = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            size = stop - start
            neg = rng.integers(0, n_items, size=(size, num_negatives))
            for _ in range(MAX_TRIES):
                n_bad = 0
                for r in range(size):
                    for j in range(num_negatives):
                        if positive[neg[r, j]]:
                            n_bad += 1
                if n_bad == 0:
                    break
                redraw = rng.integers(0, n_items, size=n_bad)
                k = 0
                for r in range(size):
                    for j in range(num_negatives):
                        if positive[neg[r, j]]:
                            neg[r, j] = redraw[k]
                            k += 1
            for r in range(size):
                blocks[row + r, 0] = items[order[start + r]]
                for j in range(num_negatives):
                    blocks[row + r, 1 + j] = neg[r, j]
            row += size
            sizes[b] = size
            batch_epochs[b] = epoch
            b += 1
    return blocks, sizes, batch_epochs


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _softplus(x):  # pragma: no cover - compiled
    return max(x, 0.0) + np.log1p(np.exp(-abs(x)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sigmoid(x):  # pragma: no cover - compiled
    if x >= 0:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x)
    return e / (1.0 + e)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _dot(x, y):  # pragma: no cover - compiled
    """float32 dot product (any order of summation: it vectorises)."""
    acc = np.float32(0.0)
    for c in range(x.shape[0]):
        acc += x[c] * y[c]
    return acc


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` rounded once (float32): LLVM's fused multiply-add."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _step(value, neg_lr, grad):  # pragma: no cover - compiled
    """``value + (-lr) * grad`` rounded once to float32, as torch's sparse SGD adds each
    occurrence's gradient (a fused multiply-add)."""
    return _fma(neg_lr, grad, value)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sgd(table, table_bias, p, blocks, sizes, batch_epochs, lr, trains_shared, l2, loss_kind):  # pragma: no cover - compiled
    """SGD over ``blocks``, whose entries are rows of ``table`` and ``table_bias`` (the global
    item arrays while they are frozen; the device's own copy of the rows it trains, which it
    updates, when ``trains_shared``). Returns the mean loss of the last epoch (NaN as soon as
    an epoch's is not finite).

    The rounding follows torch's where it can: each gradient value is formed as autograd forms
    it (the score's part plus L2's, ``l2 / B * 2 w``), and SGD adds the gradient of every
    occurrence of a row (a positive's private vector, a candidate's item row) one after another,
    each rounded once, from the values before the step. Dot products are summed in another
    order, which leaves float32 rounding differences."""
    dim = table.shape[1]
    width = blocks.shape[1]
    max_b = 0
    for s in range(sizes.shape[0]):
        max_b = max(max_b, sizes[s])
    scores = np.empty((max_b, width), dtype=np.float32)
    g = np.empty((max_b, width), dtype=np.float32)
    grad_p = np.empty((max_b, dim), dtype=np.float32)
    grad_items = np.empty((max_b * width, dim), dtype=np.float32)  # occurrences of rows a step touches twice
    pending_rows = np.empty(max_b * width, dtype=np.int64)
    pending_g = np.empty(max_b * width, dtype=np.float32)
    counts = np.zeros(table.shape[0] if trains_shared else 1, dtype=np.int32)
    neg_lr = np.float32(-lr)
    two = np.float32(2.0)
    epoch = -1
    total = 0.0
    count = 0
    last = np.nan
    row0 = 0
    for s in range(sizes.shape[0]):
        if batch_epochs[s] != epoch:
            if epoch >= 0:
                last = total / count
                if not np.isfinite(last):
                    return np.nan
            epoch = batch_epochs[s]
            total = 0.0
            count = 0
        b_size = sizes[s]
        inv_b = np.float32(1.0) / np.float32(b_size)
        coef = inv_b * l2  # d(l2 * reg / B) / d reg, in float32 as autograd forms it
        batch_loss = 0.0
        n_pending = 0
        if trains_shared:  # how often this step touches each row
            for b in range(b_size):
                for j in range(width):
                    counts[blocks[row0 + b, j]] += 1
        for b in range(b_size):
            # Scores of the positive's candidates, from the values before this step.
            for j in range(width):
                r = blocks[row0 + b, j]
                scores[b, j] = _dot(p, table[r]) + table_bias[r]
            # The loss (mean over the batch) and its gradient with respect to every score.
            if loss_kind == 0:  # sampled softmax: cross-entropy, the positive at index 0
                top = scores[b, 0]
                for j in range(1, width):
                    top = max(top, scores[b, j])
                z = np.float32(0.0)
                for j in range(width):
                    g[b, j] = np.exp(scores[b, j] - top)
                    z += g[b, j]
                batch_loss += np.log(z) + top - scores[b, 0]
                for j in range(width):
                    g[b, j] = g[b, j] / z * inv_b
                g[b, 0] -= inv_b
            elif loss_kind == 1:  # BPR: mean over (positive, negative) pairs
                scale = inv_b / np.float32(width - 1)
                g[b, 0] = 0.0
                for j in range(1, width):
                    x = scores[b, 0] - scores[b, j]
                    batch_loss += _softplus(-x) / (width - 1)
                    w = np.float32(_sigmoid(-x)) * scale
                    g[b, 0] -= w
                    g[b, j] = w
            else:  # BCE: the positive, and each negative as a negative
                batch_loss += _softplus(-scores[b, 0])
                g[b, 0] = -np.float32(_sigmoid(-scores[b, 0])) * inv_b
                for j in range(1, width):
                    batch_loss += _softplus(scores[b, j])
                    g[b, j] = np.float32(_sigmoid(scores[b, j])) * inv_b
            # The positive's gradient of the private vector (its scores' part plus L2's), and
            # each candidate's gradient of its item row, all from the values before the step.
            for c in range(dim):
                grad_p[b, c] = 0.0
            for j in range(width):
                row = table[blocks[row0 + b, j]]
                gk = g[b, j]
                for c in range(dim):
                    grad_p[b, c] += gk * row[c]
            for c in range(dim):
                grad_p[b, c] = grad_p[b, c] + coef * (two * p[c])
            if trains_shared:
                # Each candidate's gradient of its item row (the score's part plus L2's), from the
                # values before the step. A row no other positive of the step reads is stepped at
                # once; a row the step touches again keeps its gradients, stepped after the step.
                for j in range(width):
                    r = blocks[row0 + b, j]
                    gk = g[b, j]
                    if counts[r] == 1:
                        for c in range(dim):
                            table[r, c] = _step(table[r, c], neg_lr, gk * p[c] + coef * (two * table[r, c]))
                        table_bias[r] = _step(table_bias[r], neg_lr, gk)
                    else:
                        for c in range(dim):
                            grad_items[n_pending, c] = gk * p[c] + coef * (two * table[r, c])
                        pending_rows[n_pending] = r
                        pending_g[n_pending] = gk
                        n_pending += 1
        total += batch_loss  # the batch's mean loss times its size, as local_update adds it
        count += b_size
        if trains_shared:
            # SGD adds each occurrence's gradient in turn (sparse SGD), in the order of the batch.
            for k in range(n_pending):
                r = pending_rows[k]
                for c in range(dim):
                    table[r, c] = _step(table[r, c], neg_lr, grad_items[k, c])
                table_bias[r] = _step(table_bias[r], neg_lr, pending_g[k])
            for b in range(b_size):
                for j in range(width):
                    counts[blocks[row0 + b, j]] = 0
        for b in range(b_size):
            for c in range(dim):
                p[c] = _step(p[c], neg_lr, grad_p[b, c])
        row0 += b_size
    if count > 0:
        last = total / count
    return last


@numba.njit(cache=True, nogil=True, error_model="numpy")
def device_round(rng, items, q, bq, private, refit_epochs, refit_lr, epochs, lr, batch_size, num_negatives, l2, loss_kind):  # pragma: no cover - compiled
    """One device's round: ``refit_epochs`` passes on the private vector alone (step
    ``refit_lr``), then ``epochs`` passes on the private vector and the item rows (step ``lr``),
    drawing from ``rng`` exactly as two ``local_update`` calls would
    (:func:`fedpref.client.device.local_round`; ``epochs=0`` leaves out the second, as
    :func:`fedpref.client.device.refit_private` alone does).

    Returns ``(private', rows, item_rows', bias_rows', loss, ok)``: the rows the second phase
    touched (sorted item ids) with their new values, the mean loss of the last epoch, and
    False in ``ok`` when a loss was not finite (``local_update`` raises then)."""
    n_items, dim = q.shape
    p = private.astype(np.float32).copy()
    local = np.full(n_items, -1, dtype=np.int64)
    no_rows = np.empty((0, dim), dtype=np.float32)
    no_bias = np.empty(0, dtype=np.float32)
    empty = np.empty(0, dtype=np.int64)
    if items.shape[0] == 0:
        return p, empty, no_rows, no_bias, np.nan, True
    if refit_epochs > 0:
        blocks, sizes, batch_epochs = draw_batches(rng, items, n_items, refit_epochs, batch_size, num_negatives)
        loss = _sgd(q, bq, p, blocks, sizes, batch_epochs, np.float32(refit_lr), False, np.float32(l2), loss_kind)
        if not np.isfinite(loss):
            return p, empty, no_rows, no_bias, loss, False
    if epochs == 0:
        return p, empty, no_rows, no_bias, np.nan, True
    blocks, sizes, batch_epochs = draw_batches(rng, items, n_items, epochs, batch_size, num_negatives)
    touched = np.zeros(n_items, dtype=np.bool_)
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            touched[blocks[i, j]] = True
    rows = np.flatnonzero(touched)
    item_rows = np.empty((rows.shape[0], dim), dtype=np.float32)
    bias_rows = np.empty(rows.shape[0], dtype=np.float32)
    for k in range(rows.shape[0]):
        local[rows[k]] = k
        item_rows[k] = q[rows[k]]
        bias_rows[k] = bq[rows[k]]
    for i in range(blocks.shape[0]):  # the candidates as rows of the device's own copy
        for j in range(blocks.shape[1]):
            blocks[i, j] = local[blocks[i, j]]
    loss = _sgd(item_rows, bias_rows, p, blocks, sizes, batch_epochs, np.float32(lr), True, np.float32(l2), loss_kind)
    return p, rows, item_rows, bias_rows, loss, bool(np.isfinite(loss))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rank(target, scores, candidates, exclude, u):  # pragma: no cover - compiled
    """:func:`fedpref.models.metrics.rank_of_target` for one row: how many of ``candidates``
    (item ids; all items when empty) other than ``exclude`` score above ``target``, with ties
    broken by the uniform ``u``."""
    above = 0
    ties = 0
    if candidates.shape[0] == 0:
        for i in range(scores.shape[0]):
            if not exclude[i]:
                if scores[i] > target:
                    above += 1
                elif scores[i] == target:
                    ties += 1
    else:
        for i in range(candidates.shape[0]):
            s = scores[candidates[i]]
            if s > target:
                above += 1
            elif s == target:
                ties += 1
    return above + np.int64(np.floor(u * (ties + 1)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def device_evaluate(rng, items, q, bq, private, refit_epochs, lr, batch_size, num_negatives, l2, loss_kind, val_item, test_item, negatives):  # pragma: no cover - compiled
    """A device's federated evaluation (:meth:`fedpref.simulations.engines.device.SimulatedDevices.evaluate`): refit the private
    vector (``refit_epochs`` passes, shared frozen), score every item, and rank the validation
    and the test item among the fixed negatives (sampled) and among every item the device has
    not trained on (full), drawing the tie-breaking uniforms from ``rng`` in the same order.

    Returns ``(private', ranks, ok)``: ranks ``[val sampled, val full, test sampled, test
    full]``; ``ok`` False when a score is not finite (the device's evaluation fails then)."""
    n_items, dim = q.shape
    p = private.astype(np.float32).copy()
    ranks = np.zeros(4, dtype=np.int64)
    if refit_epochs > 0 and items.shape[0] > 0:
        p = device_round(rng, items, q, bq, p, refit_epochs, lr, 0, lr, batch_size, num_negatives, l2, loss_kind)[0]
    scores = np.empty(n_items, dtype=np.float64)
    finite = True
    for i in range(n_items):
        scores[i] = np.float64(_dot(p, q[i]) + bq[i])
        if not np.isfinite(scores[i]):
            finite = False
    if not finite:
        return p, ranks, False
    exclude = np.zeros(n_items, dtype=np.bool_)
    for i in range(items.shape[0]):
        exclude[items[i]] = True
    everything = np.empty(0, dtype=np.int64)
    for k in range(2):
        target = val_item if k == 0 else test_item
        ranks[2 * k] = _rank(scores[target], scores, negatives, exclude, rng.random())
        was = exclude[target]
        exclude[target] = True
        ranks[2 * k + 1] = _rank(scores[target], scores, everything, exclude, rng.random())
        exclude[target] = was
    return p, ranks, True
