"""MP-SAE (Costa et al. 2025, "From flat to hierarchical"): a sparse autoencoder whose encoder is matching
pursuit on its own decoder.

Learning (``learn`` / ``sc.learn_dictionary(x, method="mp-sae")``) runs k steps of matching pursuit on
each centred signal with the current atoms, decodes, and takes a gradient step on the reconstruction
error through the pursuit's coefficients and residuals (the atom choices are discrete and pass no
gradient); atoms are renormalised after each step. Encoding is the `mp` encoder on the dictionary,
the very pursuit training ran, so on a shared dictionary there is nothing to learn: `fit` binds it.

Matching pursuit may pick an atom it picked before, so k steps can leave fewer than k atoms active
(on paper c's known-D problem, k=3 steps gave a mean L0 of 2.8). With `distinct` (the default)
encoding therefore continues the same pursuit on the residual until k different atoms are active:
the pursuit's state is its residual alone, so this is exactly the pursuit run for more steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sparsecode_encoders.greedy import MP
from sparsecode._validation import check_int_range
from sparsecode.dictionary import Dictionary
from sparsecode.encoder import Encoded
from sparsecode.ops import unit_rows
from sparsecode.training import Batch, TrainableEncoder, TrainConfig, optimise


@dataclass(frozen=True)
class MPSAEConfig(TrainConfig):
    k: int = 16
    """Atoms per signal: training runs k matching-pursuit steps; encoding runs k steps too, then (with
    `distinct`) goes on until k different atoms are active."""
    distinct: bool = True
    """Encoding continues the pursuit past k steps until k distinct atoms are active (at most
    4 k steps, or until the residual vanishes): an atom picked twice leaves k steps with fewer than k atoms.
    False: exactly k steps, as in training and as the `mp` encoder."""


#: Encoding with `distinct` stops a signal after this many steps per atom of k (a dictionary whose atoms
#: keep re-explaining the residual) or when the residual vanishes (a signal spanned by fewer atoms).
MAX_STEPS_PER_ATOM = 4


def pursuit(x: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable matching pursuit on unit-norm atoms: codes (n, n_atoms) and the residual (n, d).

    Each step picks the atom of largest |correlation| with the residual and subtracts its projection,
    the steps of `encoders.greedy.MP`; gradients flow to x and the atoms through the coefficients and
    the residual.
    """
    r = x
    codes = x.new_zeros(x.shape[0], atoms.shape[0])
    for _ in range(k):
        corr = r @ atoms.T
        pick = corr.detach().abs().argmax(dim=1, keepdim=True)
        coef = corr.gather(1, pick)
        codes = codes.scatter_add(1, pick, coef)
        r = r - coef * atoms[pick.squeeze(1)]
    return codes, r


class MPSAE(TrainableEncoder):
    """Matching-pursuit SAE: learns a dictionary with k steps of matching pursuit as its encoder."""

    name = "mp-sae"
    family = "greedy"
    knob = "k"
    Config = MPSAEConfig
    #: on a shared dictionary it is matching pursuit itself: nothing to train, no training signals needed
    trainable = False
    #: the pursuit it hands signals to removes the dictionary's bias itself
    sees_raw_input = True

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self._mp: MP | None = None          # the pursuit on the bound dictionary
        self._step: MP | None = None        # one more step of it, on residuals (no bias)

    def _fit(self, x, y=None) -> None:
        # bind only: encoding is matching pursuit on the frozen dictionary
        self.d_in = self.dictionary.d
        self.net = self._build(self.d_in, self.dictionary.n_atoms, None, None)
        self._mp = self._pursuit_on(self.dictionary)

    def learn(self, x, n_atoms: int, y=None) -> Dictionary:
        """Learn n_atoms unit-norm atoms and a decoder bias with matching pursuit as the encoder."""
        check_int_range("n_atoms", n_atoms, 1)
        if y is not None:
            raise ValueError("mp-sae reconstructs its input; it cannot learn a transcoder (targets y)")
        k = self.config.k
        if k > n_atoms:
            raise ValueError(f"k={k} is larger than n_atoms={n_atoms}")
        x, _, stream = self._data(x, None, None)
        gen = torch.Generator().manual_seed(self.config.seed)
        atoms = torch.randn(n_atoms, x.shape[1], generator=gen, dtype=torch.float64).to(x)
        atoms = nn.Parameter(unit_rows(atoms))
        b_dec = nn.Parameter(x.mean(0).clone())
        track = bool(self.config.resample_every)

        def loss_fn(batch):
            xb = x[batch] if stream is None else batch.to(dtype=x.dtype)
            codes, r = pursuit(xb - b_dec, atoms, k)
            loss = (r * r).mean()
            if not track:
                return loss
            # dead-atom resampling needs the batch: handed to this step's `after_step`
            return loss, Batch(xb, xb, (xb - r).detach(), (codes != 0).any(0).detach())

        self.losses = optimise([atoms, b_dec], loss_fn, x.shape[0], self.config, what=f"train {self.name}",
                               lr=self._learning_rate(n_atoms), after_step=self._dictionary_step(atoms),
                               device=x.device,
                               stream=stream)
        self.dictionary = Dictionary(atoms.detach().clone(), b_dec.detach().clone(),
                                     metadata={"learned_by": self.name, "config": dataclasses.asdict(self.config)})
        self.d_in = x.shape[1]
        self.net = self._build(self.d_in, n_atoms, None, None)
        self._mp = self._pursuit_on(self.dictionary)
        return self.dictionary

    def _build(self, d_in, n_atoms, x, atoms):
        return nn.Module()          # no weights of its own: the encoder is the pursuit on the dictionary

    def _codes(self, x):
        return self._mp.encode(x)

    def _pursuit_on(self, dictionary: Dictionary) -> MP:
        """The matching pursuit this encoder is, on `dictionary` (made when the dictionary is bound)."""
        self._step = MP(k=1).fit(Dictionary(dictionary.atoms))
        return MP(k=self.config.k).fit(dictionary)

    def _work_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def _encode_with_info(self, x) -> Encoded:
        info = self._mp.encode_with_info(x)
        if not self.config.distinct:
            return info
        codes, k = info.codes, self.config.k
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        signal = x if self.dictionary.bias is None else x - self.dictionary.bias.to(x)
        # a residual this small is rounding: the signal is spanned by the atoms it has
        vanished = (100 * torch.finfo(x.dtype).eps) ** 2 * (signal * signal).sum(1)
        steps = torch.full((x.shape[0],), float(k), dtype=torch.float64, device=x.device)
        for _ in range((MAX_STEPS_PER_ATOM - 1) * k):
            rows = ((codes != 0).sum(1) < k).nonzero().flatten()
            if not rows.numel():
                break
            r = signal[rows] - codes[rows] @ atoms
            alive = (r * r).sum(1) > vanished[rows]
            rows, r = rows[alive], r[alive]
            if not rows.numel():
                break
            codes[rows] += self._step.encode(r)
            steps[rows] += 1
        return Encoded(codes, n_iter=float(steps.mean()) if steps.numel() else float(k), variant=info.variant,
                       working_bytes=info.working_bytes)

    def flops_per_signal(self, encoded=None) -> float:
        # a planned count (`Encoder.planned_flops`) binds only the dictionary: the pursuit is made for it
        mp = self._mp if self._mp is not None else self._pursuit_on(self.dictionary)
        flops = mp.flops_per_signal(encoded)
        if self.config.distinct and encoded is not None and encoded.n_iter is not None:
            # each step past k: the residual from the codes (2 n_atoms d) and one gram-free pursuit step
            n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
            flops += (encoded.n_iter - self.config.k) * (2 * n_atoms * d + self._step.flops_per_signal())
        return flops
