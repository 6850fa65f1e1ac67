"""What every trained encoder shares: the optimiser (Signum) and the training loop.

A `TrainableEncoder` learns its network in `fit(dictionary, x, y)` with the dictionary frozen
(the shared-dictionary comparison), or learns network and dictionary together in `learn`
(the joint comparison, and `sc.learn_dictionary`). `y` is the reconstruction target; it defaults
to `x` (an autoencoder) and differs for a transcoder (MLP input -> MLP output). Trained encoders
are written and read by `encoder_file`; each method's losses live beside it in its plug-in.
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from . import checkpoint, distributed, encoder_file
from ._validation import as_tensor, check_int_range, check_positive
from .dictionary import Dictionary
from .encoder import Encoder, EncoderConfig
from .ops import unit_rows
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


def progress_callback() -> Callable[[str, int, int, float], None] | None:
    """The callback of the enclosing `progress` block, or None: for any long loop that reports steps."""
    return _progress.get()


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
    checkpoint_every: int = 0
    """Steps between training checkpoints, where checkpoints are kept (`train`: beside OUT); 0: every
    10 minutes of training. It does not change the result, so a run may resume with another value."""

    def validate(self) -> None:
        super().validate()
        check_int_range("steps", self.steps, 1)
        check_int_range("resample_every", self.resample_every, 0)
        check_int_range("checkpoint_every", self.checkpoint_every, 0)
        check_int_range("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        if self.optimizer not in ("adam", "signum"):
            raise ValueError(f"optimizer must be 'adam' or 'signum', got {self.optimizer!r}")


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    return Signum(params, lr=lr) if name == "signum" else torch.optim.Adam(params, lr=lr)


def optimise(params: list[torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int,
             cfg: TrainConfig, *, what: str, lr: float | None = None, after_step: Callable[[], None] | None = None,
             device=None, stream=None, identity: dict | None = None) -> list[float]:
    """Minimise ``loss_fn(batch_indices)`` over minibatches of range(n); returns the loss per step.

    `loss_fn` returns the loss, or ``(loss, aux)``: then ``after_step(aux)`` gets what the step
    computed besides its loss (e.g. which atoms fired); otherwise ``after_step()`` takes nothing.
    With `stream` (an activation store's `TokenRange`), ``loss_fn`` gets the batches of signals
    themselves, read shard by shard, shuffled within the reader's buffer, a new order every pass.

    Under a launcher (`sparsecode.distributed`) the training is data-parallel: every rank draws the
    same global batch (same seed), takes its contiguous part of it (`Group.part`), and the gradients
    of the parts, weighted by their share, are summed over ranks before every step. For a loss that
    is a mean over signals this is the global batch's gradient, so N ranks follow one process's
    path up to float rounding; a loss with batch statistics computes them with `batch_mean`, which
    averages over the global batch, and so does too.

    Within a `checkpoint.checkpoints` block the loop checkpoints every `cfg.checkpoint_every` steps
    and resumes from a checkpoint of the same training (`identity`: what else it must match, e.g.
    the data's checksum); an `after_step` with a ``state`` dict of tensors has them saved too.
    """
    group = distributed.current()
    if group.distributed and min(cfg.batch_size, n) < group.world_size:
        raise ValueError(f"{what}: batch_size={min(cfg.batch_size, n)} is smaller than the {group.world_size} ranks "
                         "that share every batch")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer([p for p in params if p.requires_grad], cfg.optimizer, lr or cfg.lr)
    hook_state: dict[str, torch.Tensor] = getattr(after_step, "state", {})
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    saver = checkpoint.Checkpointer(what, {"config": config, "signals": n, "streamed": stream is not None,
                                           "parameters": [list(p.shape) for p in params], **(identity or {})},
                                    cfg.checkpoint_every)
    callback = _progress.get()
    losses: list[float] = []
    full = cfg.batch_size >= n
    order, pos = None, n
    first = 0
    saved = saver.resume()
    if saved is not None:
        try:
            first, losses, order, pos = _restore(saved, params, opt, hook_state, gen, device)
        except KeyError as err:
            raise ValueError(f"checkpoint {saver.path} lacks the tensor {err}: it is not a whole checkpoint of "
                             f"{what}; delete it to start afresh") from None
    batches = None if stream is None else _stream_batches(stream, cfg, device, first, group)
    every = max(1, cfg.steps // 10)
    small = all(p.device.type == "cpu" for p in params) and \
        sum(p.numel() for p in params) * min(cfg.batch_size, n) <= SMALL_STEP
    # Small steps on the CPU run single-threaded: each of their many tiny operations would otherwise
    # wait at torch's thread-pool barrier, and on a machine with other work that barrier waits for a
    # descheduled thread (measured: 200 steps of a 16-atom SAE, 4 s single-threaded, 27 s with two
    # threads while other processes ran).
    with one_thread_per_op() if small else contextlib.nullcontext():
        for step in range(first, cfg.steps):
            weight = 1.0
            if batches is not None:
                idx, weight = next(batches)           # this rank's rows of the global batch, and their share
            else:
                if full:
                    idx = torch.arange(n)
                else:
                    if pos + cfg.batch_size > n:
                        order, pos = torch.randperm(n, generator=gen), 0
                    idx = order[pos:pos + cfg.batch_size]
                    pos += cfg.batch_size
                if group.distributed:
                    share = group.part(len(idx))
                    idx, weight = idx[share.start:share.stop], len(share) / len(idx)
            token, step_token = _step_group.set(group if group.distributed else None), _step_number.set(step)
            try:
                loss = loss_fn(idx.to(device) if device is not None and batches is None else idx)
            finally:
                _step_group.reset(token)
                _step_number.reset(step_token)
            loss, aux = loss if isinstance(loss, tuple) else (loss, _NO_AUX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{what}: loss became {loss.item()} at step {step}; lower lr={lr or cfg.lr}")
            opt.zero_grad(set_to_none=True)
            (loss * weight if group.distributed else loss).backward()
            if group.distributed:
                loss = _all_reduce_grads(group, opt, loss.detach() * weight)
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step() if aux is _NO_AUX else after_step(aux)
            losses.append(float(loss.detach()))
            if saver.due(step + 1, cfg.steps):
                saver.save(step + 1, _state(params, opt, hook_state, gen, losses, order, pos, device))
            if callback is not None:
                callback(what, step + 1, cfg.steps, losses[-1])
            if step % every == 0 or step == cfg.steps - 1:
                log.info("%s: step %d/%d loss %.6g", what, step + 1, cfg.steps, losses[-1])
    saver.finish()
    return losses


def _state(params, opt, hook_state, gen, losses, order, pos, device) -> dict[str, torch.Tensor]:
    """Everything a resumed loop needs to take the uninterrupted loop's next step (a stream's place
    follows from the step: see `_stream_batches`)."""
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{key}": torch.as_tensor(value) for key, value in state.items()})
    tensors.update({f"hook.{key}": value for key, value in hook_state.items()})
    tensors.update(checkpoint.rng_state(gen, None if device is None else torch.device(device)))
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    tensors["data.position"] = torch.tensor([pos], dtype=torch.int64)
    if order is not None:
        tensors["data.order"] = order
    return tensors


def _restore(saved, params, opt, hook_state, gen, device):
    """Put a checkpoint's state back; returns (first step, losses, order, pos)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"param.{i}"])
        for key, value in hook_state.items():
            value.copy_(saved[f"hook.{key}"])
    state: dict[int, dict] = {}
    for name, value in saved.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    loaded = opt.state_dict()
    loaded["state"] = state
    opt.load_state_dict(loaded)
    checkpoint.set_rng_state(saved, gen, None if device is None else torch.device(device))
    pos = saved["data.position"].tolist()[0]
    return int(saved["step"]), saved["losses"].tolist(), saved.get("data.order"), pos


_step_group: contextvars.ContextVar = contextvars.ContextVar("sparsecode_step_group", default=None)
_step_number: contextvars.ContextVar = contextvars.ContextVar("sparsecode_step_number", default=None)


def current_step() -> int | None:
    """The step (from 0) whose loss `optimise` is computing, None outside it. A loss that changes with
    the step (a penalty switched on after a warm-up) reads it here rather than counting calls, so a
    training resumed from a checkpoint continues at the right step."""
    return _step_number.get()


def batch_mean(values: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The mean over dim 0 of a training batch's `values` (n, ...), for losses built on batch statistics.

    `rows` given: `values` already is the mean of that many rows (e.g. ``h.T @ h / n``, whose rows
    need not be materialised). In a data-parallel step (`optimise` under a launcher) the rows are
    this rank's part of the global batch: the result is the global batch's mean (the parts' sums
    and counts, all-reduced) and its gradient is this part's mean's. `optimise` weights each part's
    gradient by its share and sums them, so a loss that is a function of such means gets the one-
    process gradient: for a mean m and a loss f(m), sum_r share_r f'(m) d(mean_r) = f'(m) dm.
    Elsewhere it is this batch's mean."""
    local = values.mean(0) if rows is None else values
    count = values.shape[0] if rows is None else rows
    group = _step_group.get()
    if group is None:
        return local
    flat = local.detach().reshape(-1) * count
    total = group.sum(torch.cat([flat, flat.new_tensor([count])]))
    return (total[:-1] / total[-1]).view_as(local) + (local - local.detach())


def batch_rows(rows: int) -> int:
    """The rows of the global batch of which this step's batch of `rows` is a part (see `batch_mean`)."""
    group = _step_group.get()
    return rows if group is None else int(group.sum(torch.tensor([float(rows)])))


def _all_reduce_grads(group, opt: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' (share-weighted) gradients, and losses, in one collective; returns the loss."""
    params = [p for g in opt.param_groups for p in g["params"]]
    flat = torch.cat([loss.reshape(1)] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                           for p in params])
    flat = group.sum(flat)
    pos = 1
    for p in params:
        p.grad = flat[pos:pos + p.numel()].view_as(p).to(p.dtype)
        pos += p.numel()
    return flat[0]


_NO_AUX = object()


#: A streamed training reads its token range as this many equal contiguous sub-ranges ("lanes"), each
#: shuffled on its own, and every batch takes a fixed share of rows from each. Under a launcher the
#: ranks take whole lanes, so each reads only its own part of the store, and the global batch (so the
#: training) is the same for any number of ranks that divides the lanes.
LANES = 8
#: Tokens a lane's reader mixes at a time, shared out among the lanes a process reads.
LANE_BUFFER_TOKENS = 65536


def _stream_batches(stream, cfg: TrainConfig, device, first_step: int, group):
    """Endless training batches from a store's token range, from step `first_step` on: pairs of this
    rank's rows of each global batch and their share of it.

    Lane s holds ``n_s`` tokens and gives ``r_s`` rows to every batch (``r_s = n_s`` when the batch is
    as large as the range: every step then sees all of it). Rows are taken pass after pass, a new
    shuffle each pass, across a pass's end, so every batch has the same size and lane s's place after
    t steps is ``divmod(t r_s, n_s)``: a resumed training needs no other record of where it was.
    Ranks take contiguous runs of whole lanes where their number divides the lanes' (the rows each
    rank reads are then its part of the global batch in order); otherwise every rank reads every lane
    and takes its part of the global batch (`Group.part`).
    """
    if stream.n_tokens < 1:
        raise ValueError(f"the token range to train on is empty ({stream.n_tokens} tokens)")
    n_lanes = min(LANES, stream.n_tokens, cfg.batch_size)
    base, extra = divmod(stream.n_tokens, n_lanes)
    sizes = [base + (s < extra) for s in range(n_lanes)]
    starts = [sum(sizes[:s]) for s in range(n_lanes)]
    if cfg.batch_size >= stream.n_tokens:
        rows = sizes
    else:
        share, more = divmod(cfg.batch_size, n_lanes)
        rows = [share + (s < more) for s in range(n_lanes)]
    whole = sum(rows)
    by_lanes = group.distributed and n_lanes % group.world_size == 0
    mine = group.part(n_lanes) if by_lanes else range(n_lanes)
    buffer = max(1, LANE_BUFFER_TOKENS // len(mine))
    lanes = [_lane(type(stream)(stream.store, stream.start + starts[s], sizes[s], stream.normalize), rows[s],
                   cfg.seed * 1_000_003 + s * 10_007, first_step * rows[s], buffer) for s in mine]
    while True:
        xb = torch.cat([next(lane) for lane in lanes])
        weight = len(xb) / whole
        if group.distributed and not by_lanes:
            share = group.part(len(xb))
            xb, weight = xb[share.start:share.stop], len(share) / len(xb)
        yield (xb.to(device) if device is not None else xb), weight


def _lane(part, rows: int, seed: int, taken: int, buffer_tokens: int):
    """Endless batches of exactly `rows` signals of the token range `part`, pass after pass (pass p
    shuffled with seed ``seed + p``), starting after the first `taken` rows of that sequence."""
    passes, skip = divmod(taken, part.n_tokens)
    held: list[torch.Tensor] = []
    count = 0
    while True:
        for xb in part.batches(rows, shuffle=True, seed=seed + passes, buffer_tokens=buffer_tokens):
            if skip >= len(xb):
                skip -= len(xb)
                continue
            xb, skip = xb[skip:], 0
            held.append(xb)
            count += len(xb)
            while count >= rows:
                joined = torch.cat(held)
                yield joined[:rows]
                held, count = [joined[rows:]], count - rows
        passes += 1


class Forward(NamedTuple):
    """A trained encoder's forward pass on a batch: what the loss needs, returned rather than kept."""

    codes: torch.Tensor
    """Differentiable codes (n, n_atoms)."""
    units: torch.Tensor | None = None
    """The method's own units before they become codes (e.g. binary bits), where its penalty acts on them."""
    direct: torch.Tensor | None = None
    """A part of the reconstruction that bypasses the dictionary (a skip-transcoder's linear skip), added to it."""


class Batch(NamedTuple):
    """What a joint training step saw, for dead-atom resampling."""

    x: torch.Tensor
    y: torch.Tensor
    y_hat: torch.Tensor
    fired: torch.Tensor
    """Atoms that were active on at least one signal of the batch (n_atoms,) bool."""


class _DictionaryStep:
    """`TrainableEncoder._dictionary_step`'s hook. `state` holds what it carries from step to step (for
    checkpoints); under data-parallel training the atoms' firing is summed over the ranks' parts."""

    def __init__(self, encoder: "TrainableEncoder", atoms: torch.Tensor, normalise: bool):
        self.encoder, self.atoms, self.normalise = encoder, atoms, normalise
        self.state = {"fired": torch.zeros(atoms.shape[0], dtype=torch.bool, device=atoms.device),
                      "step": torch.zeros(1, dtype=torch.int64), "resampled": torch.zeros(1, dtype=torch.int64)}

    def __call__(self, batch: Batch | None = None) -> None:
        every, fired = self.encoder.config.resample_every, self.state["fired"]
        self.state["step"] += 1
        if batch is not None and every:
            # firing over the global batch, every step, so that every rank holds (and rank 0
            # checkpoints) the same record: n_atoms values, little beside the gradients' all-reduce
            fired.logical_or_(distributed.current().sum(batch.fired.double()) > 0)
            if int(self.state["step"]) % every == 0:
                self.state["resampled"] += self.encoder._resample(~fired, self.atoms, batch)
                fired.zero_()
        self.encoder.resampled = int(self.state["resampled"])
        if self.normalise:
            self.atoms.copy_(unit_rows(self.atoms))


class TrainableEncoder(Encoder):
    """An encoder with a network learned from data. Subclasses define `_build` and `_codes` (or `forward`)."""

    trainable = True
    learns_dictionary = True
    #: the network is trained on raw signals (decoding adds the bias), so it sees them as given
    sees_raw_input = True
    Config: type[TrainConfig]

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.net: nn.Module | None = None
        self.d_in: int | None = None
        self.losses: list[float] = []

    # --- for subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _build(self, d_in: int, n_atoms: int, x: torch.Tensor, atoms: torch.Tensor | None) -> nn.Module:
        """The network for inputs of size d_in; `atoms` (n_atoms, d) is the dictionary when known (None:
        joint training, where the network's own decoder is learned too)."""

    @abc.abstractmethod
    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable codes (n, n_atoms) of inputs x (n, d_in) from `self.net`."""

    def forward(self, x: torch.Tensor) -> Forward:
        """The codes of a batch and what the method's penalty needs besides them."""
        return Forward(self._codes(x))

    def _penalty(self, out: Forward) -> torch.Tensor | float:
        """Added to the reconstruction loss (sparsity, entropy...)."""
        return 0.0

    def _reconstruction_loss(self, y, y_hat) -> torch.Tensor:
        return ((y - y_hat) ** 2).mean()

    def _loss(self, y, y_hat, out: Forward, decode) -> torch.Tensor:
        """A training batch's loss from its targets y, reconstruction y_hat = decode(out.codes) and
        forward pass; methods whose loss decodes more than the codes (nested prefixes, a gate) use
        `decode`, the training decoder (an affine map)."""
        return self._reconstruction_loss(y, y_hat) + self._penalty(out)

    def _learning_rate(self, n_atoms: int) -> float:
        return self.config.lr or 1e-3

    # --- the template's hooks -------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.net is not None

    @property
    def d_input(self) -> int:
        return self.d_in or self.dictionary.d

    def _bind_for_count(self, dictionary: Dictionary) -> None:
        super()._bind_for_count(dictionary)
        self.d_in = dictionary.d

    def _work_dtype(self, x: torch.Tensor) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x)

    def _follow(self, device: torch.device) -> None:
        # a network trained (or loaded) on one device encodes signals on another: it moves once, in place
        net = getattr(self, "net", None)
        held = None if net is None else next(itertools.chain(net.parameters(), net.buffers()), None)
        if held is not None and held.device != device:
            self.net.to(device)

    # --- fitting ----------------------------------------------------------------------------
    def _fit(self, x, y=None) -> None:
        """Train the network on x (n, d_in) to reconstruct y (default x) through the frozen dictionary.

        x may also be an activation store or a range of one (``store.tokens(start, n)``): training
        then reads it batch by batch, shard by shard, and holds only a sample (for initialisation).
        """
        x, y, stream = self._data(x, y, self.dictionary.d)
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        bias = None if self.dictionary.bias is None else self.dictionary.bias.to(x)
        self.net = self._seeded_build(x, self.dictionary.n_atoms, atoms)
        self.d_in = x.shape[1]
        self.losses = self._train(x, y, lambda z: z @ atoms + (0 if bias is None else bias), self.net.parameters(),
                                  self.dictionary.n_atoms, stream=stream,
                                  identity={"dictionary": checkpoint.data_checksum(atoms)})
        self.net.eval()

    def _seeded_build(self, x: torch.Tensor, n_atoms: int, atoms: torch.Tensor | None) -> nn.Module:
        """`_build` under the config's seed, without touching the caller's random state."""
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.config.seed)
            return self._build(x.shape[1], n_atoms, x, atoms).to(x)

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
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.config.seed)
            self.net = self._build(x.shape[1], n_atoms, x, None).to(x)
            if transcoder:
                # "starts at zero", but not exactly: a latent that never fires keeps its start, and a
                # dictionary may hold no zero row (1e-8 of the targets' scale changes no training step)
                atoms = 1e-8 * float(y.std()) * torch.randn(n_atoms, y.shape[1], dtype=x.dtype, device=x.device)
            else:
                atoms = self._initial_atoms(n_atoms, x)
        atoms = nn.Parameter(atoms)
        b_dec = nn.Parameter(y.mean(0).clone())
        self.d_in = x.shape[1]

        track = bool(self.config.resample_every)
        after_step = self._dictionary_step(atoms, normalise=not transcoder)

        self.losses = self._train(x, y, lambda z: z @ atoms + b_dec, [*self.net.parameters(), atoms, b_dec],
                                  n_atoms, after_step=after_step, stream=stream, track=track)
        self.net.eval()
        self.dictionary = Dictionary(atoms.detach().clone(), b_dec.detach().clone(),
                                     metadata={"learned_by": self.name, "config": dataclasses.asdict(self.config)})
        return self.dictionary

    def _dictionary_step(self, atoms: torch.Tensor, normalise: bool = True) -> Callable:
        """The step hook of learning a dictionary: every `resample_every` steps, atoms that fired on no
        signal since the last check restart from the batch the step saw (`Batch`, the loss's aux);
        then the atoms go back to unit norm (unless not `normalise`: a transcoder's decoder)."""
        self.resampled = 0
        return _DictionaryStep(self, atoms, normalise)

    def _resample(self, dead: torch.Tensor, atoms: torch.Tensor, batch: Batch) -> int:
        """Point dead atoms (and their encoder rows) at the worst-reconstructed signals of `batch`.

        In a data-parallel step `batch` is this rank's part: each rank offers its own worst signals,
        every rank picks the worst of all offers (the global batch's worst, ranked as one process
        ranks them) and centres inputs on the global batch's mean, so all ranks (and one process)
        make the same change."""
        n_dead = int(dead.sum())
        if not n_dead:
            return 0
        xb, residuals = batch.x, batch.y - batch.y_hat
        group = distributed.current()
        residuals, inputs = group.worst(n_dead, (residuals ** 2).sum(1), residuals, xb)
        if group.distributed:
            totals = group.sum(torch.cat([xb.sum(0), xb.new_tensor([xb.shape[0]])]))
            mean = totals[:-1] / totals[-1]
        else:
            mean = xb.mean(0)
        idx = dead.nonzero().flatten()[: len(residuals)]
        atoms[idx] = unit_rows(residuals)
        rows = getattr(self.net, "encoder_rows", None)
        if callable(rows) and rows().shape[1] == xb.shape[1]:
            rows()[idx] = 0.2 * unit_rows(inputs - mean)
        log.info("%s: resampled %d dead atoms", self.name, len(idx))
        return len(idx)

    def _initial_atoms(self, n_atoms: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder start for joint training: the encoder's rows, normalised (their transpose init)."""
        w = getattr(self.net, "encoder_rows", None)
        atoms = w().detach().clone() if callable(w) else torch.randn(n_atoms, x.shape[1], dtype=x.dtype, device=x.device)
        return unit_rows(atoms)

    def _data(self, x, y, d_out):
        """(x, y, stream): the signals and targets as tensors, or for a store (or a range of one) a
        sample of its first tokens, which initialisation uses, and the range to stream."""
        from .activations import as_token_range
        stream = as_token_range(x)
        if stream is None:
            return (*self.training_tensors(x, y, d_out), None)
        if y is not None:
            raise ValueError("targets y go with signals given as tensors; a store is streamed as its own targets")
        return (*self.training_tensors(stream.head(STREAM_SAMPLE), None, d_out), stream)

    def training_tensors(self, x, y=None, d_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training signals and targets (default the signals) as float tensors on x's device, checked
        against each other and, given `d_out`, against the dictionary's d."""
        x = as_tensor(x, "x")
        y = x if y is None else as_tensor(y, "y", device=x.device, dtype=x.dtype)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if d_out is not None and y.shape[1] != d_out:
            raise ValueError(f"targets have d={y.shape[1]} but the dictionary's atoms have d={d_out}")
        if x.dtype not in (torch.float32, torch.float64):
            x, y = x.float(), y.float()
        return x, y

    def _train(self, x, y, decode, params, n_atoms: int, after_step=None, stream=None,
               track: bool = False, identity: dict | None = None) -> list[float]:
        def loss_fn(batch):
            if stream is None:
                xb, yb = x[batch], y[batch]
            else:
                xb = yb = batch.to(dtype=x.dtype)
            out = self.forward(xb)
            y_hat = decode(out.codes) if out.direct is None else decode(out.codes) + out.direct
            loss = self._loss(yb, y_hat, out, decode)
            if not track:
                return loss
            # only dead-atom resampling needs the batch, handed to the step's `after_step`
            return loss, Batch(xb, yb, y_hat.detach(), (out.codes != 0).any(0).detach())

        self.net.train()
        return optimise(list(params), loss_fn, x.shape[0], self.config, what=f"train {self.name}",
                        lr=self._learning_rate(n_atoms), after_step=after_step, device=x.device, stream=stream,
                        identity={"data": checkpoint.data_checksum(x), "targets": checkpoint.data_checksum(y),
                                  **(identity or {})})

    # --- files ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the trained encoder as `PATH.safetensors` and `PATH.json` (see `encoder_file.save_encoder`)."""
        return encoder_file.save_encoder(self, path)

    def restore(self, dictionary: Dictionary, d_in: int, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Rebuild the network for inputs of width `d_in` on `dictionary` and load its saved `state`
        (names as in ``net.state_dict()``); a state of another shape is refused, naming the tensor."""
        atoms = dictionary.atoms
        self.dictionary = dictionary          # a network may be built from it (LISTA's step size)
        net = self._build(d_in, dictionary.n_atoms, torch.zeros(1, d_in, dtype=atoms.dtype), atoms)
        expected = net.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source} does not hold a {self.name} network: "
                             + "; ".join(f"{what} {', '.join(names)}" for what, names in
                                         (("missing", missing), ("unexpected", unexpected)) if names))
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"{source}: net.{name} has shape {tuple(tensor.shape)}, but a {self.name} "
                                 f"encoder with d_in={d_in}, n_atoms={dictionary.n_atoms} needs "
                                 f"{tuple(expected[name].shape)}")
        net.load_state_dict(state)
        self.d_in, self.net = d_in, net.to(atoms.dtype).eval()
