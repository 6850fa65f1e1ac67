"""Binary sparse coders: every latent is 0 or 1 (times one decode scale per atom on a shared dictionary).

- `binary-topk` (Quirke, Shabalin, Belrose): learned per-latent threshold, TopK, then fire the
  selected latents whose pre-activation is positive; sigmoid straight-through gradient; Signum.
- `binary-entropy` (Cho et al.): step function with a straight-through gradient, minibatch entropy
  and covariance penalties, optional more-bit decoding.

Against a shared dictionary the codes are ``a_i * s_i`` with a learned scale ``s_i > 0`` per atom,
so they still decode with the dictionary. When learning their own dictionary the scale is learned
too by default (`decode_scale`): with unit-norm decoder rows and pure 0/1 codes (paper a's
setting, ``decode_scale=false``) each firing latent adds a whole unit vector, which cannot match
activations normalised to unit mean squared norm. Paper b's decoder is unconstrained, which the
scale reproduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsecode.metrics import binary_entropy_bits
from sparsecode.training import Forward, TrainableEncoder, TrainConfig, batch_mean, batch_rows, current_step


def fvu_loss(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """FVU of a batch: squared error over squared deviation from the batch mean (paper a's loss)."""
    deviation = batch_mean(((y - batch_mean(y).detach()) ** 2).sum(1))
    return batch_mean(((y - y_hat) ** 2).sum(1)) / deviation.clamp_min(torch.finfo(y.dtype).tiny)


def entropy_penalty(h: torch.Tensor) -> torch.Tensor:
    """Paper b's L_e: sum over features of the binary entropy (bits) of their minibatch firing rate."""
    return binary_entropy_bits(batch_mean(h)).sum()


def covariance_penalty(h: torch.Tensor) -> torch.Tensor:
    """Paper b's L_c: sum of |Cov(h)_ij| over pairs i != j, covariance over the minibatch."""
    c = h - batch_mean(h).detach()          # deviations sum to zero over the batch: the mean's gradient cancels
    n = batch_rows(h.shape[0])
    cov = batch_mean(c.T @ c / h.shape[0], rows=h.shape[0]) * (n / max(n - 1, 1))
    return cov.abs().sum() - cov.diagonal().abs().sum()


class SigmoidSTE(torch.autograd.Function):
    """Forward: 1[v > 0]. Backward: dL/dv = dL/da * s(v/T) (1 - s(v/T)), the surrogate of paper a
    (as in its code, without the 1/T factor of the exact derivative)."""

    @staticmethod
    def forward(ctx, v, temperature: float):
        ctx.save_for_backward(v)
        ctx.temperature = temperature
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        s = torch.sigmoid(v / ctx.temperature)
        return grad * s * (1 - s), None


class _Step(torch.autograd.Function):
    """Forward: the step 1[v > 0]; subclasses give the gradient that stands in for its zero derivative."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)


class SigmoidDerivativeSTE(_Step):
    """Backward: dL/dv = dL/da * s(v) (1 - s(v)), the sigmoid's derivative (paper b's gradient estimate;
    it vanishes smoothly instead of being cut at |v| = 1)."""

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        s = torch.sigmoid(v)
        return grad * s * (1 - s)


class ClippedSTE(_Step):
    """Backward: the gradient passes where |v| <= 1 (straight-through, clipped)."""

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (v.abs() <= 1).to(grad.dtype)


#: paper b's two gradient estimates of the step function
STES = {"clipped": ClippedSTE, "sigmoid": SigmoidDerivativeSTE}


@dataclass(frozen=True)
class BinaryTopKConfig(TrainConfig):
    k: int = 16
    """At most k latents fire per signal."""
    temperature: float = 2.0
    """Temperature T of the sigmoid surrogate gradient."""
    theta_init: float = 0.004
    """Initial per-latent threshold theta = exp(log_theta)."""
    optimizer: str = "signum"
    """'signum' (paper a: Adam collapses binary coders) or 'adam'."""
    lr: float = 0.0
    """Learning rate; 0 picks paper a's 3e-3 / sqrt(n_atoms / 2^15), at most 3e-3 (above it, dictionaries
    smaller than 2^15 atoms trained on modest data collapsed to no firing latent)."""
    decode_scale: bool = True
    """Learn one decode scale per atom also when learning a dictionary (false: pure 0/1 codes on unit-norm atoms)."""
    skip: bool = False
    """Skip-transcoder: add a linear map of the input, W_skip x (starting at zero), to the reconstruction;
    `skip_term(x)` gives it, as the dictionary's decode does not."""

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or self.theta_init <= 0:
            raise ValueError(f"temperature and theta_init must be > 0, got {self.temperature}, {self.theta_init}")


@dataclass(frozen=True)
class BinaryEntropyConfig(TrainConfig):
    entropy: float = 1e-3
    """Weight lam_e of the minibatch entropy penalty sum_j H2(p_j) (bits)."""
    covariance: float = 0.0
    """Weight lam_c of the covariance penalty sum_(i != j) |Cov(h)_ij|."""
    bits: int = 1
    """Binary units per atom; more than one decodes sum_t 2^-t b_t (more-bit decoding)."""
    warmup: int = 0
    """Training steps on the reconstruction loss alone before the entropy and covariance penalties
    switch on (paper b's warm-up)."""
    ste: str = "clipped"
    """Gradient of the step function: 'clipped' (identity where |v| <= 1) or 'sigmoid' (s(v)(1 - s(v)))."""
    loss: str = "mse"
    """Reconstruction loss: 'mse' (mean over signals and features) or 'sse' (squared error summed over
    features, mean over signals: paper b's L_r, the scale its penalty weights such as 1e-7 refer to)."""

    def validate(self) -> None:
        super().validate()
        if self.entropy < 0 or self.covariance < 0:
            raise ValueError(f"penalties must be >= 0, got entropy={self.entropy}, covariance={self.covariance}")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be between 1 and 16, got {self.bits}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if self.ste not in STES:
            raise ValueError(f"ste must be one of {sorted(STES)}, got {self.ste!r}")
        if self.loss not in ("mse", "sse"):
            raise ValueError(f"loss must be 'mse' or 'sse', got {self.loss!r}")


class _BinaryNet(nn.Module):
    def __init__(self, d_in: int, n_hidden: int, n_atoms: int, atoms: torch.Tensor | None, x: torch.Tensor,
                 learn_scale: bool, active: int, log_theta: float | None = None):
        super().__init__()
        if atoms is not None and atoms.shape[1] == d_in and n_hidden == atoms.shape[0]:
            w = atoms.detach().clone()
        else:
            w = torch.randn(n_hidden, d_in, dtype=x.dtype) / math.sqrt(d_in)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(n_hidden, dtype=x.dtype))
        self.center = nn.Parameter(x.detach().mean(0).clone() if x.shape[0] > 1 else torch.zeros(d_in, dtype=x.dtype))
        self.log_theta = None if log_theta is None else nn.Parameter(torch.full((n_hidden,), log_theta, dtype=x.dtype))
        # Start with `active` firing atoms summing to about a typical signal's norm.
        start = math.log(max(float(x.detach().norm(dim=1).mean()), 1e-12) / math.sqrt(active)) if learn_scale else 0.0
        self.log_scale = nn.Parameter(torch.full((n_atoms,), start, dtype=x.dtype), requires_grad=learn_scale)

    def pre(self, x):
        v = (x - self.center) @ self.weight.T + self.bias
        return v if self.log_theta is None else v - torch.exp(self.log_theta)

    def encoder_rows(self):
        return self.weight


class BinaryTopK(TrainableEncoder):
    """Paper a's binary SAE / transcoder encoder (TopK, learned thresholds, sigmoid STE, Signum)."""

    name = "binary-topk"
    family = "binary"
    knob = "k"
    Config = BinaryTopKConfig

    def _build(self, d_in, n_atoms, x, atoms):
        # on a shared dictionary (atoms given) the scale is what lets 0/1 codes decode with it
        net = _BinaryNet(d_in, n_atoms, n_atoms, atoms, x, learn_scale=self.config.decode_scale or atoms is not None,
                         active=self.config.k, log_theta=math.log(self.config.theta_init))
        if self.config.skip:
            d_out = atoms.shape[1] if atoms is not None else self._target_width
            net.skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=x.dtype))
        return net

    def learn(self, x, n_atoms: int, y=None):
        if self.config.skip:
            if y is None:
                raise ValueError("skip=true makes a skip-transcoder: it needs targets y (for instance an MLP's "
                                 "output) besides the inputs x")
            self._target_width = y.shape[1]
        return super().learn(x, n_atoms, y)

    def skip_term(self, x) -> torch.Tensor | None:
        """A skip-transcoder's W_skip x, to add to the dictionary's decode of the codes; None without `skip`."""
        with torch.no_grad():
            return self._skip(torch.as_tensor(x))

    def _skip(self, x: torch.Tensor) -> torch.Tensor | None:
        skip = getattr(self.net, "skip", None)
        return None if skip is None else x.to(skip.dtype) @ skip.T

    def forward(self, x) -> Forward:
        return Forward(self._codes(x), direct=self._skip(x))

    def _learning_rate(self, n_atoms):
        return self.config.lr or min(3e-3 / math.sqrt(n_atoms / 2 ** 15), 3e-3)

    def binary_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The 0/1 activations (n, n_atoms) before the per-atom scale."""
        v = self.net.pre(x)
        idx = v.topk(self.config.k, dim=1).indices
        mask = torch.zeros_like(v).scatter_(1, idx, 1.0)
        return SigmoidSTE.apply(v, self.config.temperature) * mask

    def _codes(self, x):
        return self.binary_codes(x) * torch.exp(self.net.log_scale)

    def _reconstruction_loss(self, y, y_hat):
        return fvu_loss(y, y_hat)

    def flops_per_signal(self, encoded=None) -> float:
        return 2 * self.d_in * self.dictionary.n_atoms + 4 * self.dictionary.n_atoms


class BinaryEntropy(TrainableEncoder):
    """Paper b's binary autoencoder encoder: h = 1[W x + b > 0], entropy and covariance penalties."""

    name = "binary-entropy"
    family = "binary"
    knob = "entropy"
    Config = BinaryEntropyConfig

    def _build(self, d_in, n_atoms, x, atoms):
        return _BinaryNet(d_in, n_atoms * self.config.bits, n_atoms, atoms, x, learn_scale=True,
                          active=max(1, n_atoms // 2))

    def _reconstruction_loss(self, y, y_hat):
        if self.config.loss == "sse":
            return ((y - y_hat) ** 2).sum(1).mean()
        return super()._reconstruction_loss(y, y_hat)

    def _initial_atoms(self, n_atoms: int, x: torch.Tensor) -> torch.Tensor:
        """Start the decoder at the least-squares decoder of the initial codes (norms into the scale).

        Random unit atoms added by ~half the bits make the first reconstructions worse than the
        mean, and training then switches every bit off for good; fitted atoms start better than it.
        """
        with torch.no_grad():
            sample = x[: min(x.shape[0], 8192)]
            h = self._group(self.bits_of(sample))
            h = h - h.mean(0)
            target = sample - sample.mean(0)
            ridge = 1e-3 * h.pow(2).sum(0).mean().clamp_min(1e-12) * torch.eye(n_atoms, dtype=x.dtype, device=x.device)
            atoms = torch.linalg.solve(h.T @ h + ridge, h.T @ target)
            norms = atoms.norm(dim=1).clamp_min(1e-6)
            self.net.log_scale.copy_(torch.log(norms))
        return atoms / norms[:, None]

    def bits_of(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden binary units (n, n_atoms * bits)."""
        return STES[self.config.ste].apply(self.net.pre(x))

    def binary_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Per-atom values before the scale: 0/1 with one bit, sum_t 2^-t b_t with more."""
        return self._group(self.bits_of(x))

    def _group(self, h: torch.Tensor) -> torch.Tensor:
        bits = self.config.bits
        if bits == 1:
            return h
        weights = 2.0 ** -torch.arange(bits, dtype=h.dtype, device=h.device)
        return (h.view(h.shape[0], -1, bits) * weights).sum(-1)

    def _codes(self, x):
        return self.forward(x).codes

    def forward(self, x) -> Forward:
        h = self.bits_of(x)                  # the penalties act on the binary units themselves
        return Forward(self._group(h) * torch.exp(self.net.log_scale), units=h)

    def _penalty(self, out: Forward):
        h = out.units
        step = current_step()
        if step is not None and step < self.config.warmup:
            return 0.0
        penalty = self.config.entropy * entropy_penalty(h)
        if self.config.covariance:
            penalty = penalty + self.config.covariance * covariance_penalty(h)
        return penalty

    def flops_per_signal(self, encoded=None) -> float:
        return 2 * self.d_in * self.dictionary.n_atoms * self.config.bits + 2 * self.dictionary.n_atoms
