"""Paper b's entropy measurement: does a binary autoencoder's code entropy track the data's rank?

Synthetic hidden states of known rank r: x = z U with z ~ N(0, I_r) and U (r, d) with orthonormal
rows, d = 32. A binary autoencoder (`binary-entropy`, its own decoder, 4x expansion: 128 atoms) is
trained on each set; the entropy of the set is estimated as the sum over atoms of the binary
entropy (bits) of each atom's firing rate on held-out states.

Paper b's training: reconstruction loss summed over features (`loss=sse`), entropy and covariance
penalties at 1e-7, switched on after a warm-up, Adam at 5e-4, minibatch 512, long schedules, and
two gradient estimates of the step function (`ste=clipped`, `ste=sigmoid`). The settings below
are that protocol with each STE, then one ingredient changed at a time: the entropy weight (the
ingredient that decides, see the README) and the covariance penalty; the warm-up is a fifth of the steps
(`--no-warmup` drops it).

Rate-distortion gives the yardstick: a quantiser of r unit-variance Gaussian coordinates that
spends R bits has squared error at best r 2^(-2R/r), so minimising that error + lam R spends
R* = (r/2) log2(2 ln2 / lam) bits: proportional to the rank, with a slope set by lam.

    python experiments/entropy.py            # 6 ranks, 2 seeds, 1000 steps (about 30 minutes on 2 busy cores)
    python experiments/entropy.py --quick    # 3 ranks, 1 seed, 600 steps, results in runs/entropy-quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparsecode as sc  # noqa: E402
from _common import RESULTS, at_least_one, save  # noqa: E402

D, N_ATOMS = 32, 128
RANKS, QUICK_RANKS = (1, 2, 4, 8, 16, 32), (1, 4, 16)
PAPER = {"loss": "sse", "entropy": 1e-7, "covariance": 1e-7, "optimizer": "adam", "lr": 5e-4, "batch_size": 512}
#: label -> binary-entropy config (the warm-up is a fifth of the steps unless a setting says 0)
SETTINGS = {
    "paper (1e-7, clipped STE)": {**PAPER, "ste": "clipped"},
    "paper (1e-7, sigmoid STE)": {**PAPER, "ste": "sigmoid"},
    "entropy 1e-3": {**PAPER, "entropy": 1e-3, "covariance": 0.0},
    "entropy 1e-2": {**PAPER, "entropy": 1e-2, "covariance": 0.0},
    "entropy 3e-2": {**PAPER, "entropy": 3e-2, "covariance": 0.0},
    "entropy 1e-2 + covariance 1e-2": {**PAPER, "entropy": 1e-2, "covariance": 1e-2},
}


def hidden_states(rank: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=gen))[0].T          # (rank, D), orthonormal rows
    return torch.randn(n, rank, generator=gen) @ basis


def rate_distortion_bits(rank: int, lam: float) -> float:
    """Bits an ideal quantiser of `rank` unit Gaussians spends minimising squared error + lam * bits."""
    return max(0.0, rank / 2 * math.log2(2 * math.log(2) / lam)) if lam > 0 else math.inf


def run(steps: int, seeds: int, ranks, warmup: int) -> list[dict]:
    rows = []
    for rank in ranks:
        for seed in range(seeds):
            x = hidden_states(rank, 4096, seed)
            train, test = x[:3072], x[3072:]
            for label, cfg in SETTINGS.items():
                cfg = {"warmup": warmup, **cfg}
                t0 = time.perf_counter()
                learned = sc.learn_dictionary(train, "binary-entropy", N_ATOMS, seed=seed, steps=steps, **cfg)
                codes = learned.encoder.encode(test)
                rows.append({"rank": rank, "seed": seed, "setting": label, "entropy_bits": sc.metrics.code_entropy(codes),
                             "fvu": sc.metrics.fvu(test, learned.dictionary.decode(codes)),
                             "l0": sc.metrics.mean_l0(codes), "dead": sc.metrics.dead_fraction(codes),
                             "seconds": time.perf_counter() - t0})
                print(f"rank {rank} seed {seed} {label}: {rows[-1]['entropy_bits']:.1f} bits, FVU {rows[-1]['fvu']:.3f}",
                      flush=True)
    return rows


def slope(rows: list[dict], label: str) -> tuple[float, float]:
    """Least-squares slope (bits per rank) and R^2 of mean entropy against rank for one setting."""
    ranks = sorted({r["rank"] for r in rows})
    means = [np.mean([r["entropy_bits"] for r in rows if r["rank"] == k and r["setting"] == label]) for k in ranks]
    a, b = np.polyfit(ranks, means, 1)
    pred = a * np.array(ranks) + b
    ss = float(np.sum((np.array(means) - np.mean(means)) ** 2))
    return float(a), (1 - float(np.sum((np.array(means) - pred) ** 2)) / ss) if ss else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=at_least_one, default=1000)
    parser.add_argument("--seeds", type=at_least_one, default=2)
    parser.add_argument("--no-warmup", action="store_true", help="penalties from the first step (the warm-up ablation)")
    parser.add_argument("--quick", action="store_true", help="3 ranks, 1 seed, 600 steps; results in runs/entropy-quick")
    args = parser.parse_args()
    torch.set_num_threads(1)             # many tiny steps: a thread pool only waits (and the machine is shared)
    ranks = QUICK_RANKS if args.quick else RANKS
    if args.quick:
        args.steps, args.seeds = 600, 1
    t0, load = time.perf_counter(), os.getloadavg()[0]
    rows = run(args.steps, args.seeds, ranks, 0 if args.no_warmup else args.steps // 5)
    elapsed = time.perf_counter() - t0

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    stats = {}
    for label in SETTINGS:
        for key in ("entropy_bits", "fvu"):
            stats[label, key] = [(np.mean([r[key] for r in rows if r["rank"] == k and r["setting"] == label]),
                                  np.std([r[key] for r in rows if r["rank"] == k and r["setting"] == label]))
                                 for k in ranks]
        for ax, key in zip(axes, ("entropy_bits", "fvu")):
            m, s = zip(*stats[label, key])
            ax.errorbar(ranks, m, yerr=s, marker="o", capsize=3, label=label)
    ideal = [rate_distortion_bits(k, 1e-2) for k in ranks]
    axes[0].plot(ranks, [min(v, N_ATOMS) for v in ideal], "k--", lw=1, label="rate-distortion, lam 1e-2")
    axes[0].set_ylabel("estimated entropy (bits)")
    axes[1].set_ylabel("FVU on held-out states")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank of the hidden states")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Binary autoencoder ({N_ATOMS} atoms, d={D}, {args.steps} steps): code entropy vs data rank, "
                 f"mean ± std over {args.seeds} seeds")
    fig.tight_layout()

    fits = {label: slope(rows, label) for label in SETTINGS}
    lines = ["| rank | " + " | ".join(SETTINGS) + " |", "|---:|" + "---:|" * len(SETTINGS)]
    for i, rank in enumerate(ranks):
        lines.append(f"| {rank} | " + " | ".join(
            f"{stats[s, 'entropy_bits'][i][0]:.1f} ± {stats[s, 'entropy_bits'][i][1]:.1f} "
            f"(FVU {stats[s, 'fvu'][i][0]:.2f})" for s in SETTINGS) + " |")
    lines.append("| bits per rank (R²) | " + " | ".join(f"{a:.2f} ({r2:.2f})" for a, r2 in fits.values()) + " |")
    table = "\n".join(lines)
    protocol = {"d": D, "n_atoms": N_ATOMS, "ranks": ranks, "steps": args.steps, "seeds": args.seeds,
                "warmup": 0 if args.no_warmup else args.steps // 5, "settings": SETTINGS, "seconds": round(elapsed),
                "load_average_at_start": load, "cpus": os.cpu_count()}
    if args.quick or args.no_warmup:               # an ablation never replaces the committed results
        out = Path("runs/entropy" + ("-quick" if args.quick else "") + ("-no-warmup" if args.no_warmup else ""))
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "entropy.png", dpi=120)
        (out / "entropy.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
        path = out / "entropy.json"
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        fig.savefig(RESULTS / "entropy.png", dpi=120)
        path = save("entropy", {"protocol": protocol, "rows": rows, "fits": fits}, table)
    print(table)
    print(f"{elapsed:.0f}s (load average {load:.1f} on {os.cpu_count()} cores at the start); saved {path}")


if __name__ == "__main__":
    main()
