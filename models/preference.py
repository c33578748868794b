"""The two preference models: matrix factorisation and a NeuMF-style network.

Both follow the contract of :mod:`fedpref.models.contract`: the user's embeddings are
private; item embeddings, item biases and network layers are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .contract import PreferenceModel


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a preference model (everything needed to rebuild it)."""

    kind: str = "mf"  # "mf" or "neumf"
    dim: int = 128  # embedding size; 128 was best on validation for MF on movielens-small (docs/reference.md)
    mlp_layers: tuple[int, ...] = (64, 32, 16)  # NeuMF only: hidden sizes of the MLP tower
    init_std: float = 0.1  # std of the normal initialisation of embeddings

    def __post_init__(self) -> None:
        if self.kind not in MODELS:
            raise ValueError(f"unknown model {self.kind!r}; choose one of {sorted(MODELS)}")
        if self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if any(h < 1 for h in self.mlp_layers) or not self.mlp_layers:
            raise ValueError(f"mlp_layers must be positive sizes, got {self.mlp_layers}")

    def build(self, n_users: int, n_items: int, *, seed: int | None = None, init: bool = True) -> PreferenceModel:
        """A new model. ``init=False`` leaves the embeddings uninitialised, for callers that
        set every array right after (initialising 9,066 x 64 normals costs a device more
        than its whole local step)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = MODELS[self.kind](n_users, n_items, self, init=init)
        model.check_contract()
        return model


class MatrixFactorization(PreferenceModel):
    """score(u, i) = <p_u, q_i> + b_i.  p (user vectors) private; q and b shared."""

    kind = "mf"
    shared_names = ("item_embedding.weight", "item_bias.weight")
    private_names = ("user_embedding.weight",)

    def __init__(self, n_users: int, n_items: int, spec: ModelSpec, *, init: bool = True) -> None:
        super().__init__(n_users, n_items)
        self.user_embedding = _embedding(n_users, spec.dim, init)
        self.item_embedding = _embedding(n_items, spec.dim, init)
        self.item_bias = _embedding(n_items, 1, init)
        if init:
            nn.init.normal_(self.user_embedding.weight, std=spec.init_std)
            nn.init.normal_(self.item_embedding.weight, std=spec.init_std)
            nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p = self.user_embedding(users)  # (B, d)
        q = self.item_embedding(items)  # (B, N, d)
        return torch.einsum("bd,bnd->bn", p, q) + self.item_bias(items).squeeze(-1)

    def logits_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_embedding(users) @ self.item_embedding.weight.T + self.item_bias.weight.T

    def user_factors(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"user": self.user_embedding(users)}

    def item_factors(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"item": self.item_embedding(items)}

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, item_chunk: int = 0) -> torch.Tensor:
        p = self.user_embedding(users)
        return p @ self.item_embedding.weight.T + self.item_bias.weight.T


class NeuMF(PreferenceModel):
    """NeuMF (He et al., 2017): a GMF branch and an MLP tower, fused by a linear layer.

    Both user embeddings are private; item embeddings and every layer are shared.
    """

    kind = "neumf"
    private_names = ("user_gmf.weight", "user_mlp.weight")

    def __init__(self, n_users: int, n_items: int, spec: ModelSpec, *, init: bool = True) -> None:
        super().__init__(n_users, n_items)
        d, layers = spec.dim, spec.mlp_layers
        self.user_gmf = _embedding(n_users, d, init)
        self.item_gmf = _embedding(n_items, d, init)
        self.user_mlp = _embedding(n_users, layers[0] // 2, init)
        self.item_mlp = _embedding(n_items, layers[0] // 2, init)
        tower: list[nn.Module] = []
        width = 2 * (layers[0] // 2)
        for h in layers[1:]:
            tower += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*tower)
        self.output = nn.Linear(d + width, 1)
        if init:
            for emb in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
                nn.init.normal_(emb.weight, std=spec.init_std)
        # Shared: both item embeddings, every tower layer and the output layer.
        self.shared_names = ("item_gmf.weight", "item_mlp.weight") + tuple(
            n for n, _ in self.named_parameters() if n.startswith(("mlp.", "output."))
        )

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        n = items.shape[1]
        gmf = self.user_gmf(users).unsqueeze(1) * self.item_gmf(items)  # (B, N, d)
        pu = self.user_mlp(users).unsqueeze(1).expand(-1, n, -1)
        mlp = self.mlp(torch.cat([pu, self.item_mlp(items)], dim=-1))
        return self.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)

    def user_factors(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"user_gmf": self.user_gmf(users), "user_mlp": self.user_mlp(users)}

    def item_factors(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"item_gmf": self.item_gmf(items), "item_mlp": self.item_mlp(items)}

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, item_chunk: int = 2048) -> torch.Tensor:
        return super().score_all(users, item_chunk)


def _embedding(rows: int, dim: int, init: bool) -> nn.Embedding:
    """An embedding; with ``init=False`` its weights are left uninitialised (and no random
    numbers are drawn, so seeded initialisations stay what they were)."""
    if init:
        return nn.Embedding(rows, dim)
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


MODELS: dict[str, type[PreferenceModel]] = {"mf": MatrixFactorization, "neumf": NeuMF}
