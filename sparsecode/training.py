"""What every trained encoder shares: optimisers, the training loop, losses, save/load.

A `TrainableEncoder` learns its network in `fit(dictionary, x, y)` with the dictionary frozen
(the shared-dictionary comparison), or learns network and dictionary together in `learn`
(the joint comparison, and `sc.learn_dictionary`). `y` is the reconstruction target; it defaults
to `x` (an autoencoder) and differs for a transcoder (MLP input -> MLP output).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import _io
from ._validation import as_tensor, check_int_range, check_positive
from .dictionary import Dictionary, as_dictionary
from .encoder import Encoded, Encoder, EncoderConfig
from .metrics import binary_entropy_bits
from .parallel import one_thread_per_op

log = logging.getLogger(__name__)
#: Tokens of a streamed store held in memory to initialise a network (decoder bias, scales).
STREAM_SAMPLE = 8192
#: parameters x batch size up to which a training step runs single-threaded on the CPU (see `optimise`)
SMALL_STEP = 1 << 24
_progress: contextvars.ContextVar = contextvars.ContextVar("sparsecode_training_progress", default=None)


@contextlib.contextmanager
def progress(callback: Callable[[str, int, int, float], None]):
    """Within this block every training loop reports ``callback(what, step, steps, loss)``."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


class Signum(torch.optim.Optimizer):
    """Sign of a momentum buffer (Bernstein et al. 2018): ``m = beta m + (1 - beta) g; p -= lr sign(m)``.

    The update size does not depend on the gradient's scale, which keeps binary coders with their
    vanishing surrogate gradients alive where Adam lets many latents die.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0):
        check_positive("lr", lr, allow_zero=False)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


@dataclass(frozen=True)
class TrainConfig(EncoderConfig):
    steps: int = 2000
    """Optimisation steps."""
    batch_size: int = 1024
    """Signals per step (the whole set when it is smaller: full-batch training)."""
    lr: float = 1e-3
    """Learning rate (0: the method's own default)."""
    optimizer: str = "adam"
    """'adam' or 'signum' (sign of momentum; the binary coders' choice)."""
    seed: int = 0
    """Seed of the initialisation and of the minibatch order."""
    resample_every: int = 0
    """When learning a dictionary: every this many steps, atoms that fired on no signal since the
    last check restart from the worst-reconstructed signals of the batch (0: never)."""

    def validate(self) -> None:
        super().validate()
        check_int_range("steps", self.steps, 1)
        check_int_range("resample_every", self.resample_every, 0)
        check_int_range("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        if self.optimizer not in ("adam", "signum"):
            raise ValueError(f"optimizer must be 'adam' or 'signum', got {self.optimizer!r}")


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    return Signum(params, lr=lr) if name == "signum" else torch.optim.Adam(params, lr=lr)


def optimise(params: list[torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int,
             cfg: TrainConfig, *, what: str, lr: float | None = None, after_step: Callable[[], None] | None = None,
             device=None, stream=None) -> list[float]:
    """Minimise ``loss_fn(batch_indices)`` over minibatches of range(n); returns the loss per step.

    With `stream` (an activation store's `TokenRange`), ``loss_fn`` gets the batches of signals
    themselves, read shard by shard, shuffled within the reader's buffer, a new order every pass.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = None if stream is None else _stream_batches(stream, cfg, device)
    opt = make_optimizer([p for p in params if p.requires_grad], cfg.optimizer, lr or cfg.lr)
    callback = _progress.get()
    losses = []
    full = cfg.batch_size >= n
    order, pos = None, n
    every = max(1, cfg.steps // 10)
    small = all(p.device.type == "cpu" for p in params) and \
        sum(p.numel() for p in params) * min(cfg.batch_size, n) <= SMALL_STEP
    # Small steps on the CPU run single-threaded: each of their many tiny operations would otherwise
    # wait at torch's thread-pool barrier, and on a machine with other work that barrier waits for a
    # descheduled thread (measured: 200 steps of a 16-atom SAE, 4 s single-threaded, 27 s with two
    # threads while other processes ran).
    with one_thread_per_op() if small else contextlib.nullcontext():
        for step in range(cfg.steps):
            if batches is not None:
                idx = next(batches)
            elif full:
                idx = torch.arange(n)
            else:
                if pos + cfg.batch_size > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + cfg.batch_size]
                pos += cfg.batch_size
            loss = loss_fn(idx.to(device) if device is not None and batches is None else idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{what}: loss became {loss.item()} at step {step}; lower lr={lr or cfg.lr}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(what, step + 1, cfg.steps, losses[-1])
            if step % every == 0 or step == cfg.steps - 1:
                log.info("%s: step %d/%d loss %.6g", what, step + 1, cfg.steps, losses[-1])
    return losses


def _stream_batches(stream, cfg: TrainConfig, device):
    """Endless training batches from a store's token range (an epoch is one pass over it)."""
    epoch = 0
    while True:
        produced = False
        for xb in stream.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            produced = True
            yield xb.to(device) if device is not None else xb
        if not produced:
            raise ValueError(f"the token range to train on is empty ({stream.n_tokens} tokens)")
        epoch += 1


def fvu_loss(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """FVU of a batch: squared error over squared deviation from the batch mean."""
    return ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(torch.finfo(y.dtype).tiny)


def entropy_penalty(h: torch.Tensor) -> torch.Tensor:
    """Paper b's L_e: sum over features of the binary entropy (bits) of their minibatch firing rate."""
    return binary_entropy_bits(h.mean(0)).sum()


def covariance_penalty(h: torch.Tensor) -> torch.Tensor:
    """Paper b's L_c: sum of |Cov(h)_ij| over pairs i != j, covariance over the minibatch."""
    c = h - h.mean(0)
    cov = c.T @ c / max(h.shape[0] - 1, 1)
    return cov.abs().sum() - cov.diagonal().abs().sum()


class TrainableEncoder(Encoder):
    """An encoder with a network learned from data. Subclasses define `_build` and `_codes`."""

    trainable = True
    #: decoders of joint training start from the normalised encoder rows (SAEs) or at zero (transcoders)
    Config: type[TrainConfig]

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.net: nn.Module | None = None
        self.d_in: int | None = None
        self.losses: list[float] = []
        self._n_atoms: int | None = None
        self._joint = False             # learning its own decoder (joint mode) rather than a shared one
        self._track = False             # record firing and the last batch for dead-atom resampling

    # --- for subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _build(self, d_in: int, n_atoms: int, x: torch.Tensor, atoms: torch.Tensor | None) -> nn.Module:
        """The network for inputs of size d_in; `atoms` (n_atoms, d) is the dictionary when known."""

    @abc.abstractmethod
    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable codes (n, n_atoms) of inputs x (n, d_in) from `self.net`."""

    def _penalty(self, codes: torch.Tensor) -> torch.Tensor | float:
        """Added to the reconstruction loss (sparsity, entropy...)."""
        return 0.0

    def _reconstruction_loss(self, y, y_hat) -> torch.Tensor:
        return ((y - y_hat) ** 2).mean()

    def _learning_rate(self, n_atoms: int) -> float:
        return self.config.lr or 1e-3

    # --- fitting ----------------------------------------------------------------------------
    def fit(self, dictionary, x=None, y=None) -> "TrainableEncoder":
        """Train the network on x (n, d_in) to reconstruct y (default x) through the frozen dictionary.

        x may also be an activation store or a range of one (``store.tokens(start, n)``): training
        then reads it batch by batch, shard by shard, and holds only a sample (for initialisation).
        """
        if x is None:
            raise ValueError(f"encoder {self.name!r} is trained: call fit(dictionary, x_train)")
        self.dictionary = as_dictionary(dictionary)
        self._check_dictionary(self.dictionary)
        self._n_atoms, self._joint = self.dictionary.n_atoms, False
        x, y, stream = self._data(x, y, self.dictionary.d)
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        bias = None if self.dictionary.bias is None else self.dictionary.bias.to(x)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.config.seed)
            self.net = self._build(x.shape[1], self.dictionary.n_atoms, x, atoms).to(x)
        self.d_in = x.shape[1]
        self._track = False
        self.losses = self._train(x, y, lambda z: z @ atoms + (0 if bias is None else bias), self.net.parameters(),
                                  stream=stream)
        self.net.eval()
        return self

    def learn(self, x, n_atoms: int, y=None) -> Dictionary:
        """Learn network and dictionary together (joint mode); returns the dictionary, also kept as
        `self.dictionary`. Decoder rows stay unit norm for an autoencoder; a transcoder's (y given)
        decoder starts at zero and is not normalised."""
        check_int_range("n_atoms", n_atoms, 1)
        transcoder = y is not None
        x, y, stream = self._data(x, y, None)
        k = getattr(self.config, "k", None)
        if k is not None and k > n_atoms:
            raise ValueError(f"k={k} is larger than n_atoms={n_atoms}")
        self._n_atoms, self._joint = n_atoms, True
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.config.seed)
            self.net = self._build(x.shape[1], n_atoms, x, None).to(x)
            if transcoder:
                atoms = torch.zeros(n_atoms, y.shape[1], dtype=x.dtype, device=x.device)
            else:
                atoms = self._initial_atoms(n_atoms, x)
        atoms = nn.Parameter(atoms)
        b_dec = nn.Parameter(y.mean(0).clone())
        self.d_in = x.shape[1]

        fired = torch.zeros(n_atoms, dtype=torch.bool, device=x.device)
        step = [0]
        self.resampled = 0
        self._track = bool(self.config.resample_every)

        def after_step():
            step[0] += 1
            if self._track:
                fired.logical_or_(self._last_fired)
                if step[0] % self.config.resample_every == 0:
                    self.resampled += self._resample(~fired, atoms, b_dec)
                    fired.zero_()
            if not transcoder:
                atoms.div_(atoms.norm(dim=1, keepdim=True).clamp_min(1e-12))

        self.losses = self._train(x, y, lambda z: z @ atoms + b_dec,
                                  [*self.net.parameters(), atoms, b_dec], after_step=after_step, stream=stream)
        self.net.eval()
        self.dictionary = Dictionary(atoms.detach().clone(), b_dec.detach().clone(),
                                     metadata={"learned_by": self.name, "config": dataclasses.asdict(self.config)})
        return self.dictionary

    def _resample(self, dead: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor) -> int:
        """Point dead atoms (and their encoder rows) at the worst-reconstructed signals of the last batch."""
        n_dead = int(dead.sum())
        if not n_dead:
            return 0
        xb, yb, y_hat = self._last_batch
        worst = ((yb - y_hat) ** 2).sum(1).topk(min(n_dead, yb.shape[0])).indices
        idx = dead.nonzero().flatten()[: len(worst)]
        residual = yb[worst] - y_hat[worst]
        atoms[idx] = residual / residual.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rows = getattr(self.net, "encoder_rows", None)
        if callable(rows) and rows().shape[1] == xb.shape[1]:
            inputs = xb[worst] - xb.mean(0)
            rows()[idx] = 0.2 * inputs / inputs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        log.info("%s: resampled %d dead atoms", self.name, len(idx))
        return len(idx)

    def _initial_atoms(self, n_atoms: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder start for joint training: the encoder's rows, normalised (their transpose init)."""
        w = getattr(self.net, "encoder_rows", None)
        atoms = w().detach().clone() if callable(w) else torch.randn(n_atoms, x.shape[1], dtype=x.dtype, device=x.device)
        return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _data(self, x, y, d_out):
        """(x, y, stream): the signals and targets as tensors, or for a store (or a range of one) a
        sample of its first tokens, which initialisation uses, and the range to stream."""
        from .activations import as_token_range
        stream = as_token_range(x)
        if stream is None:
            return (*self._xy(x, y, d_out), None)
        if y is not None:
            raise ValueError("targets y go with signals given as tensors; a store is streamed as its own targets")
        return (*self._xy(stream.head(STREAM_SAMPLE), None, d_out), stream)

    def _xy(self, x, y, d_out):
        x = as_tensor(x, "x")
        y = x if y is None else as_tensor(y, "y", device=x.device, dtype=x.dtype)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if d_out is not None and y.shape[1] != d_out:
            raise ValueError(f"targets have d={y.shape[1]} but the dictionary's atoms have d={d_out}")
        if x.dtype not in (torch.float32, torch.float64):
            x, y = x.float(), y.float()
        return x, y

    def _train(self, x, y, decode, params, after_step=None, stream=None) -> list[float]:
        def loss_fn(batch):
            if stream is None:
                xb, yb = x[batch], y[batch]
            else:
                xb = yb = batch.to(dtype=x.dtype)
            codes = self._codes(xb)
            y_hat = decode(codes)
            if self._track:                     # only dead-atom resampling needs these
                self._last_fired = (codes != 0).any(0).detach()
                self._last_batch = (xb, yb, y_hat.detach())
            return self._reconstruction_loss(yb, y_hat) + self._penalty(codes)

        self.net.train()
        return optimise(list(params), loss_fn, x.shape[0], self.config, what=f"train {self.name}",
                        lr=self._learning_rate(self._n_atoms), after_step=after_step, device=x.device, stream=stream)

    # --- use --------------------------------------------------------------------------------
    def _check_x(self, x) -> torch.Tensor:
        x = as_tensor(x, "x")
        d_in = self.d_in or self.dictionary.d
        if x.shape[1] != d_in:
            raise ValueError(f"x has d={x.shape[1]} features per signal but encoder {self.name!r} was trained "
                             f"on d={d_in}")
        return x

    def encode_with_info(self, x) -> Encoded:
        if self.net is None:
            raise RuntimeError(f"encoder {self.name!r} is not trained: call .fit(dictionary, x_train) first")
        x = self._check_x(x)
        with torch.no_grad():
            return Encoded(self._codes(x.to(next(self.net.parameters()).dtype)).to(x.dtype))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x)

    # --- files ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write `PATH.safetensors` (network and dictionary) and `PATH.json` (name, config and the
        dictionary's `input_scale`, the factor its training signals were multiplied by); the path rule
        is `_io.paired`'s. Refuses to replace files that are not a saved encoder."""
        if self.net is None:
            raise RuntimeError(f"encoder {self.name!r} is not trained: nothing to save")
        tensors_path, meta_path = _io.paired(path)
        _io.check_pair(path, ENCODER_FORMAT, "sparsecode encoder")
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors["dictionary.atoms"] = self.dictionary.atoms
        if self.dictionary.bias is not None:
            tensors["dictionary.bias"] = self.dictionary.bias
        _io.write_tensors(tensors_path, tensors)
        _io.write_json(meta_path, {"format": ENCODER_FORMAT, "encoder": self.name, "d_in": self.d_in,
                                   "n_atoms": self.dictionary.n_atoms, "input_scale": self.dictionary.input_scale,
                                   "config": dataclasses.asdict(self.config)})
        return tensors_path


ENCODER_FORMAT = "sparsecode.encoder"


def load_encoder(path) -> TrainableEncoder:
    """Rebuild a trained encoder written by `TrainableEncoder.save` (safetensors + JSON only)."""
    from .registry import get_encoder       # the registry imports nothing from here: no cycle at import

    tensors_path, meta_path = _io.paired(path)
    meta = _io.read_json(meta_path, "sparsecode encoder description",
                         {"encoder": str, "d_in": int, "n_atoms": int, "config": dict}, format=ENCODER_FORMAT)
    tensors = _io.read_tensors(tensors_path, "encoder")
    if "dictionary.atoms" not in tensors:
        raise ValueError(f"{tensors_path} lacks its dictionary (tensor 'dictionary.atoms'); it has "
                         f"{', '.join(sorted(tensors)) or 'nothing'}")
    enc = get_encoder(meta["encoder"], **meta["config"])
    if not isinstance(enc, TrainableEncoder):
        raise ValueError(f"{meta_path}: {meta['encoder']!r} is not a trained encoder")
    atoms = tensors["dictionary.atoms"]
    if atoms.ndim != 2 or atoms.shape[0] != meta["n_atoms"]:
        raise ValueError(f"{tensors_path}: dictionary.atoms has shape {tuple(atoms.shape)} but {meta_path.name} "
                         f"says n_atoms={meta['n_atoms']}")
    scale = meta.get("input_scale", 1.0)
    enc.dictionary = Dictionary(atoms, tensors.get("dictionary.bias"),
                                metadata={} if scale == 1.0 else {"input_scale": float(scale)})
    enc.d_in = meta["d_in"]
    x_like = torch.zeros(1, enc.d_in, dtype=atoms.dtype)
    enc.net = enc._build(enc.d_in, atoms.shape[0], x_like, atoms)
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    expected = enc.net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{tensors_path} does not hold a {meta['encoder']} network: "
                         + "; ".join(f"{what} {', '.join(names)}" for what, names in
                                     (("missing", missing), ("unexpected", unexpected)) if names))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{tensors_path}: net.{name} has shape {tuple(tensor.shape)}, but a {meta['encoder']} "
                             f"encoder with d_in={enc.d_in}, n_atoms={atoms.shape[0]} needs "
                             f"{tuple(expected[name].shape)}")
    enc.net.load_state_dict(state)
    enc.net.to(atoms.dtype).eval()
    return enc
