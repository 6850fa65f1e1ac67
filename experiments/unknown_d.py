"""Paper c, regime "unknown D and Z": every method learns its own dictionary and codes.

Same data protocol as known_d.py (N=16, M=8, K=3, 1,024 train / 1,024 test, 5 seeds). Each method
learns N atoms from the training signals, then encodes the test signals; dictionary MCC and code
MCC are measured against the truth with atoms/latents matched one-to-one. Methods: SAE training
(ReLU+L1, TopK), binary TopK autoencoder, alternating sparse coding with FISTA or OMP codes, and
the references scikit-learn MiniBatchDictionaryLearning and SPAMS trainDL.

    python experiments/unknown_d.py [--steps 5000] [--seeds 5]
"""
from __future__ import annotations

import sparsecode as sc
from _common import seeds_experiment

N, M, K, LAM = 16, 8, 3, 0.01
LASSO_LAM = LAM * M / (2 * N)
KEYS = ("dictionary_mcc", "code_mcc", "fvu", "l0")
LABELS = {"dictionary_mcc": "dictionary MCC", "code_mcc": "code MCC", "fvu": "FVU", "l0": "L0"}


def variants(steps: int) -> list[tuple[str, str, dict]]:
    """(row label, learning method, options)."""
    return [
        ("relu", "relu", {"steps": steps, "l1_coefficient": LAM}),
        ("topk", "topk", {"steps": steps, "k": K}),
        ("binary-topk", "binary-topk", {"steps": steps, "k": K}),
        ("sparse-coding/fista", "sparse-coding", {"inference": "fista", "lam": LASSO_LAM, "n_iter": 30}),
        ("sparse-coding/omp", "sparse-coding", {"inference": "omp", "k": K, "n_iter": 50}),
        ("sklearn", "sklearn", {"lam": 0.05}),
        ("spams", "spams", {"lam": 0.05}),
    ]


def run(steps: int, seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        data = sc.synthetic.make_sparse_data(n_samples=2048, d=M, n_atoms=N, k=K, seed=seed)
        train, test = data.split(1024)
        for label, method, options in variants(steps):
            res = sc.compare([method], test, x_train=train.x, joint=True, seed=seed,
                             encoder_params={method: options})
            rows.append({"seed": seed, **res.rows[0], "encoder": label})
        print(f"seed {seed}: " + ", ".join(f"{r['encoder']} {r['dictionary_mcc']:.3f}"
                                           for r in rows if r["seed"] == seed), flush=True)
    return rows


def main() -> None:
    seeds_experiment("unknown_d", __doc__, run, KEYS, LABELS, {"N": N, "M": M, "K": K, "lam": LAM}, ("dictionary_mcc", "code_mcc"),
                     f"Unknown D and Z (N={N}, M={M}, K={K})")


if __name__ == "__main__":
    main()
