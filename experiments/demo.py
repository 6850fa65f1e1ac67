"""`make demo`: the point of sparsecode in under a minute, on a dictionary of a real SAE's size.

16,384 random unit atoms in d=576 (SmolLM2-135M's width at about 28x expansion), 256 signals that
are each a sum of 32 atoms with |N(0,1)| weights. Three ways to infer the codes on the *same*
dictionary: the amortised floor (a TopK encoder whose weights are the decoder's own rows: one
matrix product and a top-k, what an SAE's encoder costs), OMP at the same k, and FISTA (the lasso,
at the penalty derived from the data). The table says how well each recovers the planted codes
and at what speed; the last line reads it.

    python experiments/demo.py [--n-atoms 16384] [--d 576] [--k 32] [--n-samples 256]
"""
from __future__ import annotations

import argparse
import time

import torch

import sparsecode as sc


def tied_topk(dictionary: sc.Dictionary, k: int, x: torch.Tensor):
    """A TopK SAE encoder whose weights are the dictionary's rows (no bias, no training): the
    cheapest amortised encoder for this decoder."""
    enc = sc.get_encoder("topk", k=k, bias=False, steps=1).fit(dictionary, x[:1])
    with torch.no_grad():
        enc.net.weight.copy_(dictionary.atoms_as(x.dtype, x.device))
    return enc


def main(argv=None) -> sc.Comparison:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-atoms", type=int, default=16384)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = sc.synthetic.make_sparse_data(args.n_samples, args.d, args.n_atoms, args.k, seed=args.seed)
    res = sc.compare([tied_topk(data.dictionary, args.k, data.x), "omp", "fista"], data, reference=None)
    res.rows[0]["encoder"] = "topk (tied: decoder rows as encoder)"
    print(res)
    topk, omp, fista = res.rows
    print(f"\nReading: on the same {args.n_atoms:,} x {args.d} dictionary, OMP recovers the planted supports with "
          f"F1 {omp['f1']:.2f} (FVU {omp['fvu']:.3g}) where the amortised encoder gets F1 {topk['f1']:.2f} "
          f"(FVU {topk['fvu']:.3g}); OMP costs {topk['signals_per_s'] / omp['signals_per_s']:.0f}x the amortised "
          f"encoder's time, FISTA (lam {fista['lam']:.3g}, L0 {fista['l0']:.1f}) "
          f"{topk['signals_per_s'] / fista['signals_per_s']:.0f}x with F1 {fista['f1']:.2f}. "
          f"Better inference on the same decoder closes the amortisation gap, at a price this table measures. "
          f"({time.perf_counter() - start:.0f} s)")
    return res


if __name__ == "__main__":
    main()
