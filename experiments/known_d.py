"""Paper c, regime "known D": every encoder infers codes on the true dictionary.

Data (O'Neill, Gumran, Klindt): N=16 atoms in M=8 dimensions, K=3 non-zeros with |N(0,1)| values,
1,024 training and 1,024 test signals, 5 seeds (each seed draws the data and starts the networks).
Trained encoders learn with the decoder fixed to the truth on MSE + 0.01 mean|z| (means over the
batch and over dimensions / atoms), full-batch Adam at lr 1e-3.

Two protocols:
  ours   5,000 steps; the SAE encoder starts at the atoms, without bias; ITO 2,000 Adam steps at lr 0.01.
         Beyond the paper: FISTA on the same objective, OMP with k=K, LISTA, TopK and paper a's binary
         TopK encoder in the same table.
  paper  the paper's code: 20,000 steps; the SAE encoder ReLU(Wx + b) and the MLP
         ReLU(W2 ReLU(W1 x + b1) + b2) (hidden 32 and 256) start at torch.nn.Linear's default (uniform,
         with biases); the decoder has no bias; ITO on log-codes from -10, Adam lr 1e-3, as many
         steps as training. FISTA on the same objective for reference.
  --ablation (with the paper protocol) retrains the SAE and the MLP varying one ingredient at a time:
         optimisation length, penalty weight, width, initialisation and bias.

    python experiments/known_d.py [--protocol ours|paper] [--ablation] [--quick] [--steps N] [--seeds S]

--quick: 2 seeds and a quarter of the steps (ITO's learning rate scaled up so it covers the same
distance); results then go to *_quick files beside the full ones.
"""
from __future__ import annotations

import argparse
import time

import sparsecode as sc
from _common import at_least_one, markdown_table, report_seeds, save, summarise

N, M, K, LAM = 16, 8, 3, 0.01
# The paper's per-signal loss mean_d(r^2) + LAM mean_atoms|z| equals (2/M) times the lasso
# 0.5||r||^2 + lam ||z||_1 with lam = LAM * M / (2 N): FISTA solves exactly ITO's problem.
LASSO_LAM = LAM * M / (2 * N)
#: the paper's known-D script: 20,000 full-batch Adam steps at lr 1e-3, for training and for ITO
PAPER_STEPS, PAPER_LR = 20_000, 1e-3
KEYS = ("code_mcc", "live_mcc", "dead", "fvu", "l0", "flops_per_signal")
LABELS = {"code_mcc": "code MCC", "live_mcc": "MCC of live latents", "dead": "dead", "fvu": "FVU", "l0": "L0",
          "flops_per_signal": "FLOPs/signal"}
ABLATION_KEYS = ("code_mcc", "live_mcc", "dead", "fvu", "l0", "seconds")
ABLATION_LABELS = {**LABELS, "seconds": "train s"}


def ours(steps: int) -> list[tuple[str, str, dict]]:
    """(row label, encoder, options) of our protocol."""
    return [("relu", "relu", {"steps": steps, "l1_coefficient": LAM}),
            ("mlp", "mlp", {"steps": steps, "l1_coefficient": LAM, "hidden": 256}),
            ("topk", "topk", {"steps": steps, "k": K}),
            ("binary-topk", "binary-topk", {"steps": steps, "k": K}),
            ("ito", "ito", {"l1_coefficient": LAM}),
            ("lista", "lista", {"steps": steps, "lam": LASSO_LAM, "positive": True}),
            ("fista", "fista", {"lam": LASSO_LAM, "positive": True, "tol": 1e-7}),
            ("omp", "omp", {"k": K})]


def paper_sae(steps: int, **changes) -> dict:
    return {"steps": steps, "lr": PAPER_LR, "l1_coefficient": LAM, "bias": True, "weight_init": "uniform", **changes}


def paper_mlp(steps: int, hidden: int = 256, **changes) -> dict:
    return {"steps": steps, "lr": PAPER_LR, "l1_coefficient": LAM, "hidden": hidden, **changes}


def paper(steps: int) -> list[tuple[str, str, dict]]:
    """(row label, encoder, options) of the paper's protocol."""
    # ITO moves its log-codes about lr per Adam step from -10: fewer steps need a proportionally larger lr
    ito_lr = PAPER_LR * PAPER_STEPS / steps
    return [("sae", "relu", paper_sae(steps)),
            ("mlp-32", "mlp", paper_mlp(steps, 32)),
            ("mlp-256", "mlp", paper_mlp(steps, 256)),
            ("sae+ito", "ito", {"l1_coefficient": LAM, "steps": steps, "lr": ito_lr}),
            ("fista", "fista", {"lam": LASSO_LAM, "positive": True, "tol": 1e-7})]


def ablation(steps: int) -> list[tuple[str, str, dict]]:
    """The paper's SAE and MLP-256, one ingredient changed at a time (the label says which)."""
    return [("sae", "relu", paper_sae(steps)),
            ("mlp-256", "mlp", paper_mlp(steps)),
            ("sae, 4x steps", "relu", paper_sae(4 * steps)),
            ("mlp-256, 4x steps", "mlp", paper_mlp(4 * steps)),
            ("sae, l1 0.05", "relu", paper_sae(steps, l1_coefficient=0.05)),
            ("mlp-256, l1 0.05", "mlp", paper_mlp(steps, l1_coefficient=0.05)),
            ("sae, l1 0.003", "relu", paper_sae(steps, l1_coefficient=0.003)),
            ("mlp-256, l1 0.003", "mlp", paper_mlp(steps, l1_coefficient=0.003)),
            ("mlp-32", "mlp", paper_mlp(steps, 32)),
            ("mlp-1024", "mlp", paper_mlp(steps, 1024)),
            ("sae, init at D, no bias", "relu", paper_sae(steps, weight_init="dictionary", bias=False)),
            ("mlp-256, no bias", "mlp", paper_mlp(steps, bias=False)),
            ("mlp-256, lr 3e-3", "mlp", paper_mlp(steps, lr=3e-3))]


def run(variants: list[tuple[str, str, dict]], seeds: int, after_seed=None) -> list[dict]:
    """Rows of every variant on every seed; ``after_seed(rows)`` after each seed (to save what is done)."""
    rows = []
    for seed in range(seeds):
        data = sc.synthetic.make_sparse_data(n_samples=2048, d=M, n_atoms=N, k=K, seed=seed)
        train, test = data.split(1024)
        for label, name, options in variants:
            start = time.perf_counter()
            res = sc.compare([name], test, k=K, lam=LASSO_LAM, x_train=train.x, encoder_params={name: options},
                             seed=seed, reference=None, device="cpu")
            row = {"seed": seed, **res.rows[0], "encoder": label, "seconds": time.perf_counter() - start}
            # A dead latent's column is constant: its |correlation| with every true latent is 0, so the
            # matching gives it any partner and the mean over the live ones is exactly this rescaling.
            live = 1 - row["dead"]
            row["live_mcc"] = row["code_mcc"] / live if live > 0 else 0.0
            rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{r['encoder']} {r['code_mcc']:.3f}" for r in rows if r["seed"] == seed),
              flush=True)
        if after_seed is not None:
            after_seed(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("ours", "paper"), default="ours",
                        help="ours (5,000 steps, SAE started at the atoms) or the paper's code (see above)")
    parser.add_argument("--ablation", action="store_true", help="the SAE and MLP ablation at the paper's protocol")
    parser.add_argument("--quick", action="store_true", help="2 seeds and a quarter of the steps")
    parser.add_argument("--steps", type=at_least_one, default=None,
                        help="training steps (default 5,000 ours, 20,000 paper; a quarter with --quick)")
    parser.add_argument("--seeds", type=at_least_one, default=None, help="default 5, or 2 with --quick")
    args = parser.parse_args()
    if args.ablation and args.protocol != "paper":
        parser.error("--ablation varies the paper's protocol: give --protocol paper")
    steps = args.steps or (PAPER_STEPS if args.protocol == "paper" else 5000) // (4 if args.quick else 1)
    seeds = args.seeds or (2 if args.quick else 5)
    variants = ablation(steps) if args.ablation else paper(steps) if args.protocol == "paper" else ours(steps)
    name = "known_d" + ("_ablation" if args.ablation else "_paper" if args.protocol == "paper" else "")
    name += "_quick" if args.quick else ""
    keys, labels = (ABLATION_KEYS, ABLATION_LABELS) if args.ablation else (KEYS, LABELS)
    start = time.time()

    def protocol() -> dict:
        return {"N": N, "M": M, "K": K, "lam": LAM, "protocol": args.protocol, "steps": steps, "seeds": seeds,
                "options": {label: options for label, _, options in variants}, "minutes": (time.time() - start) / 60}

    def partial(rows):          # a long run keeps what it has done so far (the figure comes at the end)
        summary = summarise(rows, keys)
        save(name, {"protocol": protocol(), "rows": rows, "summary": summary}, markdown_table(summary, keys, labels))

    rows = run(variants, seeds, partial)
    title = f"Known D (N={N}, M={M}, K={K}), {args.protocol} protocol{', ablation' if args.ablation else ''}"
    report_seeds(name, rows, keys, labels, protocol(), ("code_mcc", "fvu"),
                 f"{title}, {steps} steps, mean ± std over {seeds} seeds")


if __name__ == "__main__":
    main()
