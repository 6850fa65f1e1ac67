"""Paper c, regime "known D": every encoder infers codes on the true dictionary.

Protocol (O'Neill, Gumran, Klindt): N=16 atoms in M=8 dimensions, K=3 non-zeros with |N(0,1)|
values, 1,024 training and 1,024 test signals, 5 seeds. Trained encoders learn with the decoder
fixed to the truth (full-batch Adam, lr 1e-3, loss MSE + 0.01 mean|z|). ITO optimises each test
code on the same objective. Beyond the paper: FISTA on the same objective, OMP with k=K, LISTA,
and paper a's binary TopK encoder, in the same table.

    python experiments/known_d.py [--steps 5000] [--seeds 5]
"""
from __future__ import annotations

import sparsecode as sc
from _common import seeds_experiment

N, M, K, LAM = 16, 8, 3, 0.01
# The paper's per-signal loss mean_d(r^2) + LAM mean_atoms|z| equals (2/M) times the lasso
# 0.5||r||^2 + lam ||z||_1 with lam = LAM * M / (2 N): FISTA solves exactly ITO's problem.
LASSO_LAM = LAM * M / (2 * N)
KEYS = ("code_mcc", "fvu", "l0", "flops_per_signal")
LABELS = {"code_mcc": "code MCC", "fvu": "FVU", "l0": "L0", "flops_per_signal": "FLOPs/signal"}


def run(steps: int, seeds: int) -> list[dict]:
    encoders = ["relu", "mlp", "topk", "binary-topk", "ito", "lista", "fista", "omp"]
    params = {"relu": {"steps": steps, "l1_coefficient": LAM},
              "mlp": {"steps": steps, "l1_coefficient": LAM, "hidden": 256},
              "topk": {"steps": steps}, "binary-topk": {"steps": steps}, "ito": {"l1_coefficient": LAM},
              "lista": {"steps": steps, "lam": LASSO_LAM, "positive": True},
              "fista": {"lam": LASSO_LAM, "positive": True, "tol": 1e-7}}
    rows = []
    for seed in range(seeds):
        data = sc.synthetic.make_sparse_data(n_samples=2048, d=M, n_atoms=N, k=K, seed=seed)
        train, test = data.split(1024)
        res = sc.compare(encoders, test, k=K, lam=LASSO_LAM, x_train=train.x, encoder_params=params, seed=seed,
                         reference=None, device="cpu")
        for row in res.rows:
            rows.append({"seed": seed, **row})
        print(f"seed {seed}: " + ", ".join(f"{r['encoder']} {r['code_mcc']:.3f}" for r in res.rows), flush=True)
    return rows


def main() -> None:
    seeds_experiment("known_d", __doc__, run, KEYS, LABELS, {"N": N, "M": M, "K": K, "lam": LAM}, ("code_mcc", "fvu"),
                     f"Known D (N={N}, M={M}, K={K})")


if __name__ == "__main__":
    main()
