"""Amortised encoders: one forward pass per signal (the sparse autoencoder's encoder and kin).

Trained by `fit(dictionary, x)` with the dictionary frozen (paper c's "known D"), or together
with their own dictionary by `learn` (SAE training: decoder rows kept at unit norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsecode.ops import topk_relu
from sparsecode.training import Forward, TrainableEncoder, TrainConfig


#: encoder starts: the atoms themselves, or torch.nn.Linear's default (what paper c's code trains from)
INITS = ("dictionary", "uniform")


@dataclass(frozen=True)
class ReLUConfig(TrainConfig):
    l1_coefficient: float = 0.01
    """L1 weight of the training loss MSE + l1_coefficient * mean|z|, both means over the batch (and over
    dimensions / atoms), as SAELens's l1_coefficient; paper c uses 0.01. Not the lasso's lam: per signal
    this is the lasso at lam = l1_coefficient * d / (2 n_atoms), and the encoder only approximates it."""
    bias: bool = False
    """Give the encoder a bias (paper c writes its SAE encoder ReLU(Wx); its code's nn.Linear has one).
    Without one each latent fires on a half-space through the origin, however large the L1 weight: only the rows'
    directions, not their scale, can make the codes sparser."""
    weight_init: str = "dictionary"
    """Start of the encoder's weights: 'dictionary' (rows = the atoms, when the dictionary is known) or
    'uniform' (torch.nn.Linear's default, weights and bias U(-1/sqrt(d), 1/sqrt(d)), as paper c's code)."""

    def validate(self) -> None:
        super().validate()
        if self.weight_init not in INITS:
            raise ValueError(f"weight_init must be one of {', '.join(map(repr, INITS))}, got {self.weight_init!r}")


@dataclass(frozen=True)
class TopKConfig(TrainConfig):
    k: int = 16
    """Latents kept per signal: the k largest pre-activations, then ReLU."""
    bias: bool = True
    """Give the encoder a bias."""


@dataclass(frozen=True)
class MLPConfig(ReLUConfig):
    hidden: int = 256
    """Width of the hidden layer (paper c: 32 or 256)."""
    bias: bool = True
    """Biases in both layers (paper c's MLP, torch.nn.Linear layers, has them)."""
    weight_init: str = "uniform"
    """Start of the weights: 'uniform' (torch.nn.Linear's default, paper c); 'dictionary' is refused, as
    neither layer has the dictionary's shape."""

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.weight_init != "uniform":
            raise ValueError(f"the mlp encoder's layers start only at weight_init='uniform', got weight_init={self.weight_init!r}")


class Linear(nn.Module):
    """z = x W^T (+ b), with W (n_atoms, d_in) starting at the dictionary's atoms when they fit, or with
    ``init="uniform"`` at torch.nn.Linear's default (weights and bias U(-1/sqrt(d_in), 1/sqrt(d_in)))."""

    def __init__(self, d_in: int, n_atoms: int, atoms: torch.Tensor | None, bias: bool, init: str = "dictionary"):
        super().__init__()
        bound = 1 / d_in ** 0.5
        if init == "uniform":
            w = torch.empty(n_atoms, d_in).uniform_(-bound, bound)
        elif atoms is not None and atoms.shape[1] == d_in:
            w = atoms.detach().clone()
        else:
            w = torch.randn(n_atoms, d_in) / d_in ** 0.5
        self.weight = nn.Parameter(w)
        b = torch.empty(n_atoms, dtype=w.dtype).uniform_(-bound, bound) if init == "uniform" \
            else torch.zeros(n_atoms, dtype=w.dtype)
        self.bias = nn.Parameter(b) if bias else None

    def forward(self, x):
        z = x @ self.weight.T
        return z if self.bias is None else z + self.bias

    def encoder_rows(self):
        return self.weight


class _L1Mixin:
    """Paper c's L1 penalty on a mean-scaled loss (`l1_coefficient`)."""

    @classmethod
    def lam_per_unit(cls, n_atoms: int, d: int) -> float:
        # mean_d r^2 + c mean_atoms |z| is (2/d) times 0.5 ||r||^2 + (c d / (2 n_atoms)) ||z||_1
        return d / (2 * n_atoms)

    def _penalty(self, out: Forward):
        return self.config.l1_coefficient * out.codes.abs().mean()


class _LinearSAE(TrainableEncoder):
    """An SAE encoder on one linear map, W x + b, followed by `activation`."""

    family = "amortised"
    architecture: str

    def _build(self, d_in, n_atoms, x, atoms):
        return Linear(d_in, n_atoms, atoms, self.config.bias, getattr(self.config, "weight_init", "dictionary"))

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms = self.dictionary.n_atoms
        return 2 * self.d_in * n_atoms + (2 if self.architecture == "relu" else 3) * n_atoms

    def sae_weights(self) -> dict:
        """The weights in SAE terms, for export (the network sees the raw input)."""
        return {"architecture": self.architecture, "encoder_rows": self.net.weight, "b_enc": self.net.bias,
                "k": getattr(self.config, "k", None), "center": False, "threshold": None}


class ReLU(_L1Mixin, _LinearSAE):
    """The sparse autoencoder encoder ReLU(W x + b), trained with an L1 penalty."""

    name = "relu"
    knob = "l1_coefficient"
    Config = ReLUConfig
    architecture = "relu"

    def _codes(self, x):
        return torch.relu(self.net(x))


class TopK(_LinearSAE):
    """TopK SAE encoder: keep the k largest pre-activations (no sparsity penalty needed)."""

    name = "topk"
    knob = "k"
    Config = TopKConfig
    architecture = "topk"

    def _codes(self, x):
        return topk_relu(self.net(x), self.config.k)


class MLP(_L1Mixin, TrainableEncoder):
    """Two-layer encoder ReLU(W2 ReLU(W1 x + b1) + b2) (paper c's MLP encoder)."""

    name = "mlp"
    family = "amortised"
    knob = "l1_coefficient"
    Config = MLPConfig

    def _build(self, d_in, n_atoms, x, atoms):
        h, bias = self.config.hidden, self.config.bias
        return nn.Sequential(nn.Linear(d_in, h, bias=bias), nn.ReLU(), nn.Linear(h, n_atoms, bias=bias), nn.ReLU())

    def _codes(self, x):
        return self.net(x)

    def flops_per_signal(self, encoded=None) -> float:
        d, h, n = self.d_in, self.config.hidden, self.dictionary.n_atoms
        return 2 * d * h + h + 2 * h * n + n
