"""Paper c, regime "unknown D and Z": every method learns its own dictionary and codes.

Same data protocol as known_d.py (N=16, M=8, K=3, 1,024 train / 1,024 test, 5 seeds). Each method
learns N atoms from the training signals, then encodes the test signals; dictionary MCC and code
MCC are measured against the truth with atoms/latents matched one-to-one.

  ours   5,000 steps: SAE training (ReLU+L1, TopK), binary TopK autoencoder, alternating sparse
         coding with FISTA or OMP codes, and the references scikit-learn MiniBatchDictionaryLearning
         and SPAMS trainDL.
  paper  the paper's encoders trained with their decoder from scratch as in known_d.py's paper
         protocol (20,000 full-batch Adam steps at lr 1e-3; SAE ReLU(Wx + b) and MLP encoders with
         hidden 32 and 256 at torch.nn.Linear's default start), beside SPAMS's dictionary learning
         as the sparse-coding side (the alternating sparse coding's rows are in the default protocol).

    python experiments/unknown_d.py [--protocol ours|paper] [--quick] [--steps N] [--seeds S]

--quick: 2 seeds and a quarter of the steps; results then go to *_quick files beside the full ones.
"""
from __future__ import annotations

import argparse
import time

import sparsecode as sc
from _common import at_least_one, report_seeds
from known_d import PAPER_STEPS, paper_mlp, paper_sae

N, M, K, LAM = 16, 8, 3, 0.01
LASSO_LAM = LAM * M / (2 * N)
KEYS = ("dictionary_mcc", "code_mcc", "fvu", "l0", "dead")
LABELS = {"dictionary_mcc": "dictionary MCC", "code_mcc": "code MCC", "fvu": "FVU", "l0": "L0", "dead": "dead"}
SPARSE_CODING = [("sparse-coding/fista", "sparse-coding", {"inference": "fista", "lam": LASSO_LAM, "n_iter": 30}),
                 ("spams", "spams", {"lam": 0.05})]


def ours(steps: int) -> list[tuple[str, str, dict]]:
    """(row label, learning method, options)."""
    return [
        ("relu", "relu", {"steps": steps, "l1_coefficient": LAM}),
        ("topk", "topk", {"steps": steps, "k": K}),
        ("binary-topk", "binary-topk", {"steps": steps, "k": K}),
        SPARSE_CODING[0],
        ("sparse-coding/omp", "sparse-coding", {"inference": "omp", "k": K, "n_iter": 50}),
        ("sklearn", "sklearn", {"lam": 0.05}),
        SPARSE_CODING[1],
    ]


def paper(steps: int) -> list[tuple[str, str, dict]]:
    return [("sae", "relu", paper_sae(steps)), ("mlp-32", "mlp", paper_mlp(steps, 32)),
            ("mlp-256", "mlp", paper_mlp(steps, 256)), SPARSE_CODING[1]]


def run(variants: list[tuple[str, str, dict]], seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        data = sc.synthetic.make_sparse_data(n_samples=2048, d=M, n_atoms=N, k=K, seed=seed)
        train, test = data.split(1024)
        for label, method, options in variants:
            res = sc.compare([method], test, x_train=train.x, joint=True, seed=seed,
                             encoder_params={method: options})
            rows.append({"seed": seed, **res.rows[0], "encoder": label})
        print(f"seed {seed}: " + ", ".join(f"{r['encoder']} {r['dictionary_mcc']:.3f} / {r['code_mcc']:.3f}"
                                           for r in rows if r["seed"] == seed), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("ours", "paper"), default="ours",
                        help="ours (5,000 steps, every method) or the paper's encoders (see above)")
    parser.add_argument("--quick", action="store_true", help="2 seeds and a quarter of the steps")
    parser.add_argument("--steps", type=at_least_one, default=None,
                        help="training steps (default 5,000 ours, 20,000 paper; a quarter with --quick)")
    parser.add_argument("--seeds", type=at_least_one, default=None, help="default 5, or 2 with --quick")
    args = parser.parse_args()
    steps = args.steps or (PAPER_STEPS if args.protocol == "paper" else 5000) // (4 if args.quick else 1)
    seeds = args.seeds or (2 if args.quick else 5)
    variants = paper(steps) if args.protocol == "paper" else ours(steps)
    name = "unknown_d" + ("_paper" if args.protocol == "paper" else "") + ("_quick" if args.quick else "")
    start = time.time()
    rows = run(variants, seeds)
    protocol = {"N": N, "M": M, "K": K, "lam": LAM, "protocol": args.protocol, "steps": steps, "seeds": seeds,
                "options": {label: options for label, _, options in variants}, "minutes": (time.time() - start) / 60}
    report_seeds(name, rows, KEYS, LABELS, protocol, ("dictionary_mcc", "code_mcc"),
                 f"Unknown D and Z (N={N}, M={M}, K={K}), {args.protocol} protocol, {steps} steps, "
                 f"mean ± std over {seeds} seeds")


if __name__ == "__main__":
    main()
