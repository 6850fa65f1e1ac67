"""The encoder of an SAE trained by another tool (SAELens, sparsify, dictionary_learning)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecode.encoder import Encoder, EncoderConfig
from sparsecode.sae_formats import load_sae


@dataclass(frozen=True)
class SAEFileConfig(EncoderConfig):
    path: str = ""
    """SAE folder; empty: the folder the dictionary was loaded from."""
    allow_pickle: bool = False
    """Allow reading a pickle weights file (dictionary_learning's ae.pt), with torch.load(weights_only=True)."""


class SAEFile(Encoder):
    """Runs the SAE's own encoder (ReLU, TopK or JumpReLU) so its amortisation gap can be measured."""

    name = "sae-file"
    family = "amortised"
    Config = SAEFileConfig
    #: the SAE's encoder handles b_dec itself
    sees_raw_input = True

    def _fit(self, x) -> None:
        meta = self.dictionary.metadata
        path = self.config.path or meta.get("sae_path")
        if not path:
            raise ValueError("sae-file needs an SAE: load the dictionary from an SAE folder (--dictionary FOLDER) "
                             "or set path")
        self.sae = load_sae(path, self.config.allow_pickle or meta.get("sae_allow_pickle", False))
        if tuple(self.sae.atoms.shape) != (self.dictionary.n_atoms, self.dictionary.d):
            raise ValueError(f"the SAE at {path} has a ({self.sae.atoms.shape[0]}, {self.sae.atoms.shape[1]}) decoder "
                             f"but the dictionary is ({self.dictionary.n_atoms}, {self.dictionary.d})")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def sae_weights(self) -> dict:
        s = self.sae
        return {"architecture": s.architecture, "encoder_rows": s.encoder_rows, "b_enc": s.b_enc, "k": s.k,
                "center": s.center, "threshold": s.threshold}

    def flops_per_signal(self, encoded=None) -> float:
        n, d = self.dictionary.n_atoms, self.dictionary.d
        return 2 * d * n + 3 * n + (d if self.sae.center else 0)
