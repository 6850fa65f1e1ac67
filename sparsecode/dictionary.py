"""The shared dictionary: atoms as rows, decoding `x_hat = z @ atoms + bias`."""
from __future__ import annotations

from pathlib import Path

import torch

from . import _io
from ._validation import as_tensor
from .ops import unit_rows
from .sae_formats import load_sae

FORMAT = "sparsecode.dictionary"


class Dictionary:
    """A dictionary of `n_atoms` atoms in `R^d`, stored as rows.

    Parameters
    ----------
    atoms : tensor or ndarray of shape (n_atoms, d)
        The atoms. Unit L2 norm is the convention; other norms are kept and recorded in `norms`
        (the encoders take them into account), unless `normalize=True`.
    bias : tensor or ndarray of shape (d,), optional
        Decoder bias added to every reconstruction (SAE decoders have one).
    normalize : bool
        Scale every atom to unit norm.
    metadata : dict, optional
        Free-form JSON-serialisable information kept with the file.
    """

    def __init__(self, atoms, bias=None, *, normalize: bool = False, metadata: dict | None = None):
        atoms = as_tensor(atoms, "atoms")
        norms = atoms.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"atoms has zero rows (first: atom {int((norms == 0).nonzero()[0, 0])}); "
                             "every atom needs a non-zero norm")
        if normalize:
            atoms = unit_rows(atoms)
        self.atoms = atoms
        self.bias = None if bias is None else as_tensor(bias, "bias", ndim=1, dtype=atoms.dtype, device=atoms.device)
        if self.bias is not None and self.bias.shape[0] != self.d:
            raise ValueError(f"bias has {self.bias.shape[0]} entries but atoms have d={self.d}")
        self.metadata = dict(metadata or {})
        self._cache: dict = {}

    # --- shape and norms -------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    @property
    def norms(self) -> torch.Tensor:
        return self._cached("norms", None, None, lambda: self.atoms.norm(dim=1))

    @property
    def unit_norm(self) -> bool:
        tol = 1e-3 if self.atoms.dtype in (torch.float16, torch.bfloat16) else 1e-5
        return bool(((self.norms - 1).abs() <= tol).all())

    @property
    def input_scale(self) -> float:
        """The factor its signals were multiplied by when it was learned (metadata `input_scale`).

        A dictionary learned on a normalised activation store records the store's scale s: its
        atoms and codes live in the space of s * (raw activations). Encoders take signals in that
        space; `evaluate` multiplies raw activations by s before encoding and divides
        reconstructions by s; `export` folds s into the exported weights. 1.0 when not recorded.
        """
        return float(self.metadata.get("input_scale", 1.0))

    def normalized(self) -> "Dictionary":
        return Dictionary(self.atoms, self.bias, normalize=True, metadata=self.metadata)

    def __repr__(self) -> str:
        return (f"Dictionary(n_atoms={self.n_atoms}, d={self.d}, dtype={self.atoms.dtype}, "
                f"unit_norm={self.unit_norm}, bias={'yes' if self.bias is not None else 'no'})")

    # --- cached views for the solvers -----------------------------------------------------
    def _cached(self, key, dtype, device, make):
        slot = (key, dtype, None if device is None else str(torch.device(device)))
        if slot not in self._cache:
            self._cache[slot] = make()
        return self._cache[slot]

    def atoms_as(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The atoms on `device` in `dtype`, converted once and kept."""
        return self._cached("atoms", dtype, device, lambda: self.atoms.to(device=device, dtype=dtype).contiguous())

    def gram(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """`atoms @ atoms.T`, shape (n_atoms, n_atoms), computed once per dtype and device."""
        dtype = dtype or self.atoms.dtype
        device = device or self.atoms.device

        def make():
            a = self.atoms_as(dtype, device)
            return a @ a.T
        return self._cached("gram", dtype, device, make)

    def release_gram(self, dtype: torch.dtype | None = None, device=None) -> None:
        """Free the cached `gram(dtype, device)`, if any (for a caller that formed it and found it unused)."""
        self._cache.pop(("gram", dtype or self.atoms.dtype, str(torch.device(device or self.atoms.device))), None)

    def has_gram(self, dtype: torch.dtype | None = None, device=None) -> bool:
        """Whether `gram(dtype, device)` is already computed (solvers that can do without it choose by this)."""
        slot = ("gram", dtype or self.atoms.dtype, str(torch.device(device or self.atoms.device)))
        return slot in self._cache

    @property
    def lipschitz(self) -> float:
        """`||D||_2^2`, the largest eigenvalue of the Gram matrix: the lasso gradient's Lipschitz constant."""
        def make():
            a = self.atoms.detach().to(device="cpu", dtype=torch.float64)
            small = a.T @ a if self.d <= self.n_atoms else a @ a.T
            return float(torch.linalg.eigvalsh(small)[-1])
        return self._cached("lipschitz", None, None, make)

    # --- use --------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruct signals from codes of shape (n, n_atoms); returns (n, d)."""
        atoms = self.atoms_as(codes.dtype, codes.device)
        x_hat = codes @ atoms
        if self.bias is not None:
            x_hat = x_hat + self.bias.to(device=codes.device, dtype=codes.dtype)
        return x_hat

    def to(self, device=None, dtype=None) -> "Dictionary":
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return Dictionary(self.atoms.to(device=device, dtype=dtype), bias, metadata=self.metadata)

    # --- files -----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write `PATH.safetensors` (atoms, bias) and `PATH.json` (metadata) atomically; `PATH` may
        hold dots (`sae.v1`), only `.safetensors`/`.json` are taken as suffixes. Refuses to replace
        files that are not a saved dictionary."""
        tensors_path, meta_path = _io.paired(path)
        _io.check_pair(path, FORMAT, "sparsecode dictionary")
        tensors = {"atoms": self.atoms}
        if self.bias is not None:
            tensors["bias"] = self.bias
        _io.write_tensors(tensors_path, tensors)
        _io.write_json(meta_path, {"format": FORMAT, "version": 1, "n_atoms": self.n_atoms, "d": self.d,
                                   "dtype": str(self.atoms.dtype).removeprefix("torch."),
                                   "unit_norm": self.unit_norm, "metadata": self.metadata})
        return tensors_path

    @classmethod
    def load(cls, path) -> "Dictionary":
        """Read a dictionary written by `save` (either file name, or the stem, may be given)."""
        given = Path(path)
        tensors_path, meta_path = _io.paired(given)
        if given.is_file() and given.suffix not in _io.OWN_SUFFIXES:
            raise ValueError(f"{given} is a {given.suffix or 'suffix-less'} file, not a sparsecode dictionary: "
                             "expected STEM.safetensors (+ STEM.json) written by Dictionary.save, or an SAE folder"
                             + ("; pickles are never read" if given.suffix in (".pt", ".pth", ".pkl", ".bin") else ""))
        metadata = {}
        if meta_path.is_file():
            meta = _io.read_json(meta_path, "sparsecode dictionary description", {"metadata": dict}, format=FORMAT)
            metadata = meta["metadata"]
        elif given.suffix == ".json":
            raise FileNotFoundError(f"dictionary description not found: {given}")
        if not tensors_path.is_file() and meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} describes a dictionary but its tensors file {tensors_path.name} "
                                    "is missing")
        tensors = _io.read_tensors(tensors_path, "dictionary")
        if "atoms" not in tensors or tensors["atoms"].ndim != 2:
            found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()) or "nothing"
            raise ValueError(f"{tensors_path} is not a dictionary: expected a 2-D tensor 'atoms' "
                             f"(n_atoms, d), found {found}")
        return cls(tensors["atoms"], tensors.get("bias"), metadata=metadata)


def load_sae_dictionary(folder, allow_pickle: bool = False) -> Dictionary:
    """The decoder of an SAE folder (SAELens, sparsify, dictionary_learning) as a Dictionary: atoms
    = decoder rows, bias = decoder bias; the metadata names the folder, so `sae-file` finds its encoder."""
    sae = load_sae(folder, allow_pickle)
    return Dictionary(sae.atoms, sae.b_dec, metadata=sae.metadata(allow_pickle))


def as_dictionary(value, *, allow_pickle: bool = False) -> Dictionary:
    """Accept a Dictionary, an atoms array, a path to a saved dictionary, or an SAE folder (its
    decoder; `allow_pickle` as in `load_sae_dictionary`)."""
    if isinstance(value, Dictionary):
        return value
    if isinstance(value, (str, Path)):
        if Path(value).is_dir():
            return load_sae_dictionary(value, allow_pickle)
        return Dictionary.load(value)
    return Dictionary(value)
