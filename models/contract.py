"""The model contract: every parameter of a preference model is shared or private.

*Shared* parameters (item embeddings, item biases, MLP layers) are federated: a device
sends updates of them and receives their aggregate. *Private* parameters (the person's
own embedding) stay on the device, in its state, and never appear in a message.

Parameters travel as plain ``dict[str, np.ndarray]`` keyed by the torch parameter name,
so that the same arrays feed centralised training, local-only training, Flower messages
and any in-process engine.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

Params = dict[str, np.ndarray]


class ContractError(ValueError):
    """A model's declaration of shared and private parameters is wrong."""


class PreferenceModel(nn.Module):
    """Base class: subclasses declare ``shared_names`` and ``private_names``.

    ``n_users`` is the number of private rows this instance holds: 1 on a device,
    every user in centralised training.
    """

    kind: ClassVar[str]
    shared_names: ClassVar[tuple[str, ...]]
    private_names: ClassVar[tuple[str, ...]]

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        if n_users < 1:
            raise ValueError(f"n_users must be at least 1, got {n_users}")
        if n_items < 2:
            raise ValueError(f"n_items must be at least 2, got {n_items}")
        self.n_users = n_users
        self.n_items = n_items

    # -- the contract -------------------------------------------------------------
    def check_contract(self) -> None:
        """Every parameter is declared exactly once, as shared or as private."""
        names = {name for name, _ in self.named_parameters()}
        shared, private = set(self.shared_names), set(self.private_names)
        if shared & private:
            raise ContractError(f"{type(self).__name__}: declared both shared and private: {sorted(shared & private)}")
        undeclared = names - shared - private
        if undeclared:
            raise ContractError(
                f"{type(self).__name__}: parameters {sorted(undeclared)} are declared neither shared nor "
                "private; add each to shared_names or private_names"
            )
        missing = (shared | private) - names
        if missing:
            raise ContractError(f"{type(self).__name__}: declared parameters {sorted(missing)} do not exist")

    def get_shared(self) -> Params:
        return self._get(self.shared_names)

    def get_private(self) -> Params:
        return self._get(self.private_names)

    def set_shared(self, params: Params) -> None:
        self._set(params, self.shared_names, "shared")

    def set_private(self, params: Params) -> None:
        self._set(params, self.private_names, "private")

    def _get(self, names: tuple[str, ...]) -> Params:
        own = dict(self.named_parameters())
        return {n: own[n].detach().cpu().numpy().copy() for n in names}

    def _set(self, params: Params, names: tuple[str, ...], what: str) -> None:
        if set(params) != set(names):
            raise ContractError(
                f"{type(self).__name__}: expected {what} arrays {sorted(names)}, got {sorted(params)}"
            )
        own = dict(self.named_parameters())
        with torch.no_grad():
            for n in names:
                value = torch.as_tensor(np.asarray(params[n]), dtype=own[n].dtype)
                if value.shape != own[n].shape:
                    raise ContractError(
                        f"{type(self).__name__}: {what} array {n!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(own[n].shape)}"
                    )
                own[n].copy_(value)

    # -- scoring ------------------------------------------------------------------
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` for ``users``: users (B,), items (B, N) -> (B, N)."""
        raise NotImplementedError

    def logits_all(self, users: torch.Tensor) -> torch.Tensor:
        """Differentiable scores of every item, (B,) -> (B, n_items), for the full softmax loss."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap score over all items; use loss 'softmax' with sampled negatives"
        )

    def user_factors(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """The private rows a batch touches (for L2 regularisation)."""
        raise NotImplementedError

    def item_factors(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared item rows a batch touches (for L2 regularisation)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, item_chunk: int = 4096) -> torch.Tensor:
        """Scores of every item for ``users``: (B,) -> (B, n_items)."""
        out = []
        for start in range(0, self.n_items, item_chunk):
            items = torch.arange(start, min(start + item_chunk, self.n_items))
            out.append(self(users, items.expand(len(users), -1)))
        return torch.cat(out, dim=1)


def shared_norm(params: Params) -> float:
    """L2 norm over all arrays of a parameter dict taken as one vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in params.values())))
