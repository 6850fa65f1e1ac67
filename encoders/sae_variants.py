"""The SAE encoders of SAELens / dictionary_learning beyond ReLU and TopK: JumpReLU, BatchTopK,
Matryoshka BatchTopK and gated.

Each is trained like `relu` and `topk` (`encoders.amortised`): against a frozen shared dictionary by
``fit(dictionary, x)``, or with its own dictionary by ``learn`` / ``sc.learn_dictionary``. Their
training losses follow the papers:

- `jumprelu` (Rajamanoharan et al. 2024, "Jumping ahead"): ``z = pre * 1[pre > theta]`` with a learned
  threshold per latent, ``pre = ReLU(W x + b)``; loss squared error + ``l0_coefficient`` x L0, per signal. The step
  function has no gradient in theta, so the backward pass uses a straight-through estimator: a
  rectangle kernel of width `bandwidth` around the threshold (the form of SAELens' JumpReLU SAE).
- `batch-topk` (Bussmann, Leask & Nanda 2024): at training time the k x batch largest pre-activations
  of the whole batch are kept; at inference a single threshold, the running average of the smallest
  kept value, replaces the batch (so a signal's code does not depend on the other signals).
- `matryoshka` (Bussmann et al. 2025): BatchTopK whose loss sums the reconstruction errors of nested
  prefixes of the latents, so the first latents reconstruct on their own.
- `gated` (Rajamanoharan et al. 2024, "Improving dictionary learning with gated SAEs"): a gate path
  decides which latents fire, a magnitude path sharing its weights (times exp(r_mag)) how much; loss
  MSE + ``l1_coefficient`` x L1 of the gate's ReLU + an auxiliary reconstruction from the gate alone through the
  decoder held fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsecode_encoders.amortised import Linear
from sparsecode._validation import check_int_range, check_positive
from sparsecode.training import Forward, TrainableEncoder, TrainConfig


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel 1[-1/2 < u < 1/2] of the straight-through estimators."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """Forward: ``pre * 1[pre > theta]``. Backward: in pre, the gradient where the latent fires; in
    theta, the pseudo-derivative ``-(theta / eps) K((pre - theta) / eps)`` with K the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class StepFunction(torch.autograd.Function):
    """Forward: ``1[pre > theta]``. Backward: nothing in pre; ``-(1 / eps) K((pre - theta) / eps)`` in theta."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k x n largest entries of the whole batch pre (n, n_atoms), zeros elsewhere."""
    flat = pre.reshape(-1)
    values, idx = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, idx, values).view_as(pre)


def _affine_without_decoder_gradient(decode, codes: torch.Tensor) -> torch.Tensor:
    """decode(codes) with gradients into `codes` only, the decoder held fixed.

    decode is affine (z -> z A + b), so decode(z) - decode(z.detach()) = (z - z.detach()) A: zero in
    value, gradient A in z, and in A the outer product with z - z.detach() = 0.
    """
    return decode(codes.detach()).detach() + (decode(codes) - decode(codes.detach()))


# --- configs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JumpReLUConfig(TrainConfig):
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty: the loss is ||x - x_hat||^2 (summed over features, as SAELens) + l0_coefficient
    * the number of firing latents, both averaged over signals (1e-3 suits signals of unit mean squared norm,
    as a normalised activation store gives)."""
    bandwidth: float = 1e-3
    """Width eps of the rectangle kernel of the threshold's straight-through gradient (SAELens: 0.001)."""
    threshold_init: float = 1e-3
    """Initial threshold theta of every latent (SAELens: 0.001)."""
    threshold_scale: float = 1.0
    """At inference, every learned threshold times this (1: as trained; 0: a plain ReLU). An inference
    knob: `compare(target_l0=...)` calibrates it on the trained encoder."""

    def validate(self) -> None:
        super().validate()
        check_positive("l0_coefficient", self.l0_coefficient)
        check_positive("bandwidth", self.bandwidth, allow_zero=False)
        check_positive("threshold_init", self.threshold_init, allow_zero=False)
        check_positive("threshold_scale", self.threshold_scale)


@dataclass(frozen=True)
class BatchTopKConfig(TrainConfig):
    k: int = 16
    """Latents kept per signal on average: k x batch over the training batch, and about k at inference."""
    threshold_momentum: float = 0.99
    """Momentum of the running average of the smallest kept pre-activation, the learned inference threshold."""
    threshold: float | None = None
    """Inference threshold: latents whose ReLU(W x + b) exceeds it fire (None: the running average learned in
    training). An inference knob: `compare(target_l0=...)` calibrates it on the trained encoder."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}")
        check_positive("threshold", self.threshold)


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    groups: int = 4
    """Nested prefixes of the latents whose reconstruction errors are summed: the first n_atoms / 2^(groups-1)
    latents, twice as many, ..., all of them."""

    def validate(self) -> None:
        super().validate()
        check_int_range("groups", self.groups, 1)


@dataclass(frozen=True)
class GatedConfig(TrainConfig):
    l1_coefficient: float = 0.01
    """L1 weight on the gate: the loss is MSE + l1_coefficient * mean ReLU(gate pre-activation) + the
    auxiliary MSE (means over the batch and over dimensions / atoms, as the relu encoder's)."""
    threshold: float = 0.0
    """At inference, a latent fires where its gate pre-activation W x + b_gate exceeds this (0: as trained).
    An inference knob: `compare(target_l0=...)` calibrates it on the trained encoder."""

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")


# --- networks ----------------------------------------------------------------------------------
class _ThresholdNet(Linear):
    """W x + b with one learned threshold per latent, stored as its log (it stays positive)."""

    def __init__(self, d_in, n_atoms, atoms, log_threshold: float):
        super().__init__(d_in, n_atoms, atoms, bias=True)
        self.log_threshold = nn.Parameter(torch.full((n_atoms,), log_threshold, dtype=self.weight.dtype))


class _BatchTopKNet(Linear):
    """W x + b, and the inference threshold (a buffer: saved and loaded with the weights; -1 = not set)."""

    def __init__(self, d_in, n_atoms, atoms):
        super().__init__(d_in, n_atoms, atoms, bias=True)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.weight.dtype))


class _GatedNet(Linear):
    """The gate W x + b_gate, and magnitudes exp(r_mag) * (W x) + b_mag sharing W."""

    def __init__(self, d_in, n_atoms, atoms):
        super().__init__(d_in, n_atoms, atoms, bias=True)
        self.r_mag = nn.Parameter(torch.zeros(n_atoms, dtype=self.weight.dtype))
        self.b_mag = nn.Parameter(torch.zeros(n_atoms, dtype=self.weight.dtype))


# --- encoders ----------------------------------------------------------------------------------
class _SAEVariant(TrainableEncoder):
    family = "amortised"

    def _inputs(self, x) -> torch.Tensor:
        """Signals as `encode` hands them to the network: checked, in its dtype."""
        x = self._check_x(x)
        return x.to(self._work_dtype(x))

    def flops_per_signal(self, encoded=None) -> float:
        return 2 * self.d_in * self.dictionary.n_atoms + 4 * self.dictionary.n_atoms


class JumpReLU(_SAEVariant):
    """JumpReLU SAE encoder: ReLU(W x + b) kept where it exceeds a learned per-latent threshold."""

    name = "jumprelu"
    knob = "l0_coefficient"
    inference_knob = "threshold_scale"
    Config = JumpReLUConfig

    def _build(self, d_in, n_atoms, x, atoms):
        return _ThresholdNet(d_in, n_atoms, atoms, math.log(self.config.threshold_init))

    def _codes(self, x):
        return self.forward(x).codes

    def forward(self, x) -> Forward:
        # units: the step 1[pre > threshold], whose straight-through gradient trains the threshold
        pre = torch.relu(self.net(x))
        threshold = self._threshold()
        return Forward(JumpReLUFunction.apply(pre, threshold, self.config.bandwidth),
                       StepFunction.apply(pre, threshold, self.config.bandwidth))

    def _threshold(self) -> torch.Tensor:
        threshold = torch.exp(self.net.log_threshold)
        return threshold if self.net.training else threshold * self.config.threshold_scale

    @torch.no_grad()
    def inference_range(self, x) -> tuple[float, float]:
        # no latent fires once every threshold exceeds its largest pre-activation
        ratio = torch.relu(self.net(self._inputs(x))) / torch.exp(self.net.log_threshold)
        return 0.0, max(float(ratio.max()), 1.0)

    def _penalty(self, out: Forward):
        return self.config.l0_coefficient * out.units.sum(1).mean()

    def _reconstruction_loss(self, y, y_hat):
        # per signal, like the L0 count: the coefficient then does not depend on the width d
        return ((y - y_hat) ** 2).sum(1).mean()

    def sae_weights(self) -> dict:
        return {"architecture": "jumprelu", "encoder_rows": self.net.weight, "b_enc": self.net.bias, "k": None,
                "center": False, "threshold": self._threshold()}


class BatchTopK(_SAEVariant):
    """BatchTopK SAE encoder: k x batch largest ReLU(W x + b) of a training batch; one threshold at inference."""

    name = "batch-topk"
    knob = "k"
    inference_knob = "threshold"
    Config = BatchTopKConfig

    def _build(self, d_in, n_atoms, x, atoms):
        return _BatchTopKNet(d_in, n_atoms, atoms)

    def _codes(self, x):
        pre = torch.relu(self.net(x))
        if not self.net.training:
            return pre * (pre > self._threshold()).to(pre.dtype)
        codes = batch_topk(pre, self.config.k)
        with torch.no_grad():
            kept = codes[codes > 0]
            if kept.numel():
                smallest = kept.min()
                old, m = self.net.threshold, self.config.threshold_momentum
                self.net.threshold.copy_(torch.where(old < 0, smallest, m * old + (1 - m) * smallest))
        return codes

    def _threshold(self) -> torch.Tensor:
        """The inference threshold: the config's, else the one learned in training."""
        if self.config.threshold is None:
            return self.net.threshold
        return torch.tensor(self.config.threshold, dtype=self.net.threshold.dtype, device=self.net.threshold.device)

    @torch.no_grad()
    def inference_range(self, x) -> tuple[float, float]:
        return 0.0, max(float(torch.relu(self.net(self._inputs(x))).max()), 1.0)

    def sae_weights(self) -> dict:
        """SAELens runs BatchTopK at inference as a JumpReLU with one threshold for every latent."""
        n_atoms = self.net.weight.shape[0]
        return {"architecture": "jumprelu", "encoder_rows": self.net.weight, "b_enc": self.net.bias, "k": None,
                "center": False, "threshold": self._threshold().clamp_min(0).expand(n_atoms)}


class Matryoshka(BatchTopK):
    """Matryoshka BatchTopK SAE encoder: BatchTopK trained so that nested prefixes of latents reconstruct."""

    name = "matryoshka"
    Config = MatryoshkaConfig

    def prefixes(self, n_atoms: int) -> list[int]:
        """Sizes of the nested prefixes, smallest first, the last one all latents."""
        sizes = {max(1, n_atoms >> (self.config.groups - 1 - g)) for g in range(self.config.groups)}
        return sorted(sizes | {n_atoms})

    def _loss(self, y, y_hat, out: Forward, decode):
        codes = out.codes
        position = torch.arange(codes.shape[1], device=codes.device)
        loss = self._reconstruction_loss(y, y_hat)            # the last prefix: all latents
        for size in self.prefixes(codes.shape[1])[:-1]:
            loss = loss + self._reconstruction_loss(y, decode(codes * (position < size)))
        return loss


class Gated(_SAEVariant):
    """Gated SAE encoder: 1[W x + b_gate > 0] * ReLU(exp(r_mag) * (W x) + b_mag)."""

    name = "gated"
    knob = "l1_coefficient"
    inference_knob = "threshold"
    Config = GatedConfig

    @classmethod
    def lam_per_unit(cls, n_atoms: int, d: int) -> float:
        # the relu encoder's scaling: mean_d r^2 + c mean_atoms |gate| is (2/d) times the lasso at c d / (2 n_atoms)
        return d / (2 * n_atoms)

    def _build(self, d_in, n_atoms, x, atoms):
        return _GatedNet(d_in, n_atoms, atoms)

    def _codes(self, x):
        return self.forward(x).codes

    def forward(self, x) -> Forward:
        # units: ReLU of the gate's pre-activation, which the penalty and the auxiliary loss act on
        wx = x @ self.net.weight.T
        gate = wx + self.net.bias
        magnitude = torch.relu(torch.exp(self.net.r_mag) * wx + self.net.b_mag)
        opens = gate > (0.0 if self.net.training else self.config.threshold)
        return Forward(opens.to(x.dtype) * magnitude, torch.relu(gate))

    @torch.no_grad()
    def inference_range(self, x) -> tuple[float, float]:
        gate = self.net(self._inputs(x))
        low, high = float(gate.min()), float(gate.max())
        return low - max(1.0, abs(low)), max(high, low + 1.0)

    def _penalty(self, out: Forward):
        return self.config.l1_coefficient * out.units.mean()

    def _loss(self, y, y_hat, out: Forward, decode):
        # the gate alone must reconstruct too; the decoder is held fixed in this term (paper's L_aux)
        aux = self._reconstruction_loss(y, _affine_without_decoder_gradient(decode, out.units))
        return super()._loss(y, y_hat, out, decode) + aux

    def flops_per_signal(self, encoded=None) -> float:
        return 2 * self.d_in * self.dictionary.n_atoms + 7 * self.dictionary.n_atoms
