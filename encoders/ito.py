"""Inference-time optimisation (paper c's "SAE+ITO"): per-signal gradient descent on a frozen decoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecode.encoder import Encoder, EncoderConfig
from sparsecode.training import TrainConfig, optimise


@dataclass(frozen=True)
class ITOConfig(EncoderConfig):
    l1_coefficient: float = 0.01
    """L1 weight: each signal minimises mean_d (x - z D)^2 + l1_coefficient * mean_atoms |z| (paper c; the
    relu encoder's training loss per signal). The same problem as the lasso with z >= 0 at
    lam = l1_coefficient * d / (2 n_atoms), which this Adam descent only approaches."""
    steps: int = 2000
    """Adam steps per batch of signals."""
    lr: float = 0.01
    """Adam learning rate on the log-codes u (z = exp(u))."""
    init: float = -10.0
    """Starting value of u: z starts at exp(init), near zero."""
    threshold: float = 1e-3
    """Codes below this are set to exactly zero (exp-parametrised codes never reach zero)."""

    def validate(self) -> None:
        super().validate()
        if self.steps < 1 or self.lr <= 0 or self.threshold < 0:
            raise ValueError(f"need steps >= 1, lr > 0, threshold >= 0; got {self.steps}, {self.lr}, {self.threshold}")


class ITO(Encoder):
    """Codes ``z = exp(u)`` (non-negative) optimised by Adam for each signal on the frozen dictionary."""

    name = "ito"
    family = "optimisation"
    knob = "l1_coefficient"
    Config = ITOConfig

    @classmethod
    def budget_params(cls, budget: int) -> dict:
        return {"steps": budget}

    @classmethod
    def lam_per_unit(cls, n_atoms: int, d: int) -> float:
        # mean_d r^2 + c mean_atoms |z| is (2/d) times 0.5 ||r||^2 + (c d / (2 n_atoms)) ||z||_1
        return d / (2 * n_atoms)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        cfg = self.config
        u = torch.full((x.shape[0], atoms.shape[0]), cfg.init, dtype=x.dtype, device=x.device, requires_grad=True)

        def loss(idx):
            z = torch.exp(u)
            per_signal = ((x - z @ atoms) ** 2).mean(1) + cfg.l1_coefficient * z.mean(1)
            return per_signal.sum()    # signals are independent: a sum keeps each one's gradient its own

        with torch.enable_grad():
            optimise([u], loss, x.shape[0], TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=x.shape[0]),
                     what="ito")
        z = torch.exp(u.detach())
        return torch.where(z >= cfg.threshold, z, torch.zeros_like(z))

    def flops_per_signal(self, encoded=None) -> float:
        d, n, t = self.dictionary.d, self.dictionary.n_atoms, self.config.steps
        return (d * n + n) + t * (4 * d * n + 2 * d + 11 * n)      # paper c's count
