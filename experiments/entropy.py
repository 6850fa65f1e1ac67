"""Paper b's entropy measurement: does a binary autoencoder's code entropy track the data's rank?

Synthetic hidden states of known rank r: x = z U with z ~ N(0, I_r) and U (r, d) with orthonormal
rows, d = 64. A binary autoencoder (`binary-entropy`, its own decoder, 64 atoms) is trained on
each set, with the minibatch entropy penalty and without it; the entropy of the set is estimated
as the sum over atoms of the binary entropy (bits) of each atom's firing rate on held-out states.

    python experiments/entropy.py [--steps 600] [--seeds 2]
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparsecode as sc  # noqa: E402
from _common import RESULTS, at_least_one, save  # noqa: E402

D, N_ATOMS, RANKS = 64, 64, (1, 2, 4, 8, 16, 32, 64)
SETTINGS = {"with entropy penalty (1e-4)": 1e-4, "without": 0.0}


def hidden_states(rank: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=gen))[0].T          # (rank, D), orthonormal rows
    return torch.randn(n, rank, generator=gen) @ basis


def run(steps: int, seeds: int) -> list[dict]:
    rows = []
    for rank in RANKS:
        for seed in range(seeds):
            x = hidden_states(rank, 4096, seed)
            train, test = x[:3072], x[3072:]
            for label, weight in SETTINGS.items():
                learned = sc.learn_dictionary(train, "binary-entropy", N_ATOMS, seed=seed, steps=steps,
                                              entropy=weight, lr=3e-3)
                codes = learned.encoder.encode(test)
                rows.append({"rank": rank, "seed": seed, "setting": label, "entropy_bits": sc.metrics.code_entropy(codes),
                             "fvu": sc.metrics.fvu(test, learned.dictionary.decode(codes)),
                             "l0": sc.metrics.mean_l0(codes), "dead": sc.metrics.dead_fraction(codes)})
            print(f"rank {rank} seed {seed}: " + ", ".join(f"{r['setting']} {r['entropy_bits']:.1f} bits"
                                                           for r in rows[-2:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=at_least_one, default=600)
    parser.add_argument("--seeds", type=at_least_one, default=2)
    args = parser.parse_args()
    rows = run(args.steps, args.seeds)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    lines = ["| rank | " + " | ".join(f"entropy (bits), {s}" for s in SETTINGS) + " | "
             + " | ".join(f"FVU, {s}" for s in SETTINGS) + " |", "|---:|" + "---:|" * (2 * len(SETTINGS))]
    stats = {}
    for label in SETTINGS:
        for key in ("entropy_bits", "fvu"):
            stats[label, key] = [(np.mean([r[key] for r in rows if r["rank"] == k and r["setting"] == label]),
                                  np.std([r[key] for r in rows if r["rank"] == k and r["setting"] == label]))
                                 for k in RANKS]
        for ax, key in zip(axes, ("entropy_bits", "fvu")):
            m, s = zip(*stats[label, key])
            ax.errorbar(RANKS, m, yerr=s, marker="o", capsize=3, label=label)
    for i, rank in enumerate(RANKS):
        lines.append(f"| {rank} | " + " | ".join(f"{stats[s, 'entropy_bits'][i][0]:.1f} ± {stats[s, 'entropy_bits'][i][1]:.1f}"
                                               for s in SETTINGS) + " | "
                     + " | ".join(f"{stats[s, 'fvu'][i][0]:.3f}" for s in SETTINGS) + " |")
    axes[0].set_ylabel("estimated entropy (bits)")
    axes[1].set_ylabel("FVU on held-out states")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank of the hidden states")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Binary autoencoder ({N_ATOMS} atoms, d={D}): code entropy vs data rank, mean ± std over "
                 f"{args.seeds} seeds")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "entropy.png", dpi=120)
    table = "\n".join(lines)
    path = save("entropy", {"protocol": {"d": D, "n_atoms": N_ATOMS, "ranks": RANKS, "steps": args.steps,
                                         "seeds": args.seeds, "settings": SETTINGS}, "rows": rows}, table)
    print(table)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
