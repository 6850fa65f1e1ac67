"""Paper c, scaling with the number of atoms: code MCC against N, at matched L0, on the true dictionary.

Grid (O'Neill, Gumran, Klindt): N in {16, 32, 64, 128, 256} atoms, M in {8, 16, 32} dimensions,
K in {3, 9, 15} non-zeros per code (|N(0,1)| values at uniform positions), 1,024 training and 1,024
test signals per cell. Every encoder infers codes on the planted dictionary (paper c's "known D"):
the SAE encoder ReLU(W x) and the MLP (hidden 256) trained with the decoder frozen, ITO, FISTA
(non-negative lasso), OMP and LISTA. Each encoder's sparsity knob (k, lam or the L1 weight; the
trained ones are retrained at every trial value) is calibrated with `sparsecode.calibrate` so that
its mean L0 on the test signals is K: the rows compare inference at the same sparsity. A cell where
a method cannot reach L0 = K (OMP or the lasso with K > M) is recorded as skipped, with the reason.

    python experiments/scaling.py --quick      # N in {16, 64, 128}, K=3, 2 seeds, short training
    python experiments/scaling.py --quick --d 32 --n-atoms 256    # adds cells to the quick results
    python experiments/scaling.py              # the paper's grid, 3 seeds (hours on a CPU)

Results: experiments/results/scaling[_quick].json (every cell; a rerun with the same settings resumes
from it), .md (mean ± std over seeds) and .png (one panel per M, one row of panels per K).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

import sparsecode as sc
from _common import RESULTS, at_least_one, save

ENCODERS = ("relu", "mlp", "ito", "fista", "omp", "lista")
FULL = {"n_atoms": [16, 32, 64, 128, 256], "d": [8, 16, 32], "k": [3, 9, 15], "seeds": 3, "steps": 5000,
        "rel_tol": 0.02, "max_steps": 20}
QUICK = {"n_atoms": [16, 64, 128], "d": [8, 16, 32], "k": [3], "seeds": 2, "steps": 600,
         "rel_tol": 0.05, "max_steps": 8}
N_TRAIN = N_TEST = 1024


def options(steps: int) -> dict[str, dict]:
    """Each encoder's options besides its calibrated knob."""
    trained = {"steps": steps, "lr": 3e-3}
    # the SAE needs its bias to reach L0 = K: without one a latent fires on a half-space through the
    # origin whatever the L1 weight (calibrated without it: L0 7.1 at best for K=3); paper c's nn.Linear has one
    return {"relu": {**trained, "bias": True}, "mlp": {**trained, "hidden": 256}, "lista": {**trained, "positive": True},
            "ito": {"steps": max(1000, steps)}, "fista": {"positive": True}, "omp": {}}


def run_cell(n_atoms: int, d: int, k: int, seed: int, settings: dict, encoders) -> list[dict]:
    data = sc.synthetic.make_sparse_data(n_samples=N_TRAIN + N_TEST, d=d, n_atoms=n_atoms, k=k, seed=seed)
    train, test = data.split(N_TRAIN)
    rows = []
    for name in encoders:
        cls = sc.encoder_class(name)
        row = {"n_atoms": n_atoms, "d": d, "k": k, "seed": seed, "encoder": name}
        params = {**options(settings["steps"])[name], **({"seed": seed} if cls.trainable else {})}
        start = time.perf_counter()
        try:
            enc, l0 = sc.calibrate(name, test.dictionary, test.x, k, params=params, x_train=train.x,
                                   rel_tol=settings["rel_tol"], max_steps=settings["max_steps"])
        except ValueError as err:       # an unreachable L0 (K > M for OMP and the lasso)
            rows.append({**row, "skipped": str(err)})
            continue
        codes = enc.encode(test.x)
        rows.append({**row, "code_mcc": sc.metrics.code_mcc(test.codes, codes), "l0": l0,
                     "knob": cls.knob, "knob_value": float(getattr(enc.config, cls.knob)),
                     "seconds": time.perf_counter() - start})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std of code MCC and L0 over seeds for every (K, M, N, encoder)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["k"], r["d"], r["n_atoms"], r["encoder"]), []).append(r)
    out = []
    for (k, d, n_atoms, name), group in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        done = [r for r in group if "code_mcc" in r]
        entry = {"k": k, "d": d, "n_atoms": n_atoms, "encoder": name, "seeds": len(done)}
        if done:
            mcc = np.array([r["code_mcc"] for r in done])
            entry.update(code_mcc=float(mcc.mean()), code_mcc_std=float(mcc.std(ddof=1)) if len(mcc) > 1 else 0.0,
                         l0=float(np.mean([r["l0"] for r in done])))
        else:
            entry["skipped"] = group[0]["skipped"]
        out.append(entry)
    return out


def table(summary: list[dict], encoders) -> str:
    lines = ["| K | M | N | " + " | ".join(f"`{e}`" for e in encoders) + " |",
             "|---:|---:|---:|" + "---:|" * len(encoders)]
    cells: dict = {}
    for e in summary:
        cells.setdefault((e["k"], e["d"], e["n_atoms"]), {})[e["encoder"]] = e
    for (k, d, n_atoms), by_encoder in cells.items():
        values = []
        for name in encoders:
            e = by_encoder.get(name)
            values.append("" if e is None else "skipped" if "skipped" in e
                          else f"{e['code_mcc']:.3f} ± {e['code_mcc_std']:.3f}")
        lines.append(f"| {k} | {d} | {n_atoms} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def figure(summary: list[dict], encoders, title: str, name: str) -> None:
    import matplotlib.pyplot as plt
    ks, ds, ns = (sorted({e[key] for e in summary}) for key in ("k", "d", "n_atoms"))
    fig, axes = plt.subplots(len(ks), len(ds), figsize=(4.2 * len(ds), 3.6 * len(ks)), squeeze=False,
                             sharey=True)
    colors = dict(zip(encoders, plt.get_cmap("tab10")(np.arange(len(encoders)))))
    for (i, k), (j, d) in itertools.product(enumerate(ks), enumerate(ds)):
        ax = axes[i][j]
        for encoder in encoders:
            pts = sorted((e["n_atoms"], e["code_mcc"], e["code_mcc_std"]) for e in summary
                         if (e["k"], e["d"], e["encoder"]) == (k, d, encoder) and "code_mcc" in e)
            if pts:
                n, mean, std = map(np.array, zip(*pts))
                ax.errorbar(n, mean, yerr=std, marker="o", ms=4, capsize=2, label=encoder, color=colors[encoder])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(f"M = {d}, K = {k}")
        ax.set_xlabel("N (atoms)")
        if j == 0:
            ax.set_ylabel("code MCC (test, matched L0 = K)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


def _per_cell(protocol: dict) -> dict:
    """What a cell's result depends on: the protocol less its grid, seed count and timing."""
    return {k: v for k, v in protocol.items() if k not in ("minutes", "n_atoms", "d", "k", "seeds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N up to 128, K=3, 2 seeds, short training")
    parser.add_argument("--seeds", type=at_least_one, default=None, help="seeds per cell (default 3, quick 2)")
    parser.add_argument("--steps", type=at_least_one, default=None,
                        help="training steps of relu, mlp and lista (default 5,000, quick 600)")
    parser.add_argument("--n-atoms", type=at_least_one, nargs="+", default=None, help="replace the N grid")
    parser.add_argument("--d", type=at_least_one, nargs="+", default=None, help="replace the M grid")
    parser.add_argument("--k", type=at_least_one, nargs="+", default=None, help="replace the K grid")
    parser.add_argument("--plot", action="store_true",
                        help="only redraw the table and figure from the saved results (of a run cut short)")
    args = parser.parse_args()
    torch.set_num_threads(1)        # tiny problems: threads only wait on each other (and on other users)
    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("seeds", args.seeds), ("steps", args.steps), ("n_atoms", args.n_atoms), ("d", args.d),
                       ("k", args.k)):
        if value is not None:
            settings[key] = value
    name = "scaling_quick" if args.quick else "scaling"
    protocol = {**settings, "encoders": list(ENCODERS), "options": options(settings["steps"]),
                "n_train": N_TRAIN, "n_test": N_TEST, "matched_l0": "K"}
    rows: list[dict] = []
    path = RESULTS / f"{name}.json"
    if args.plot:
        if not path.exists():
            parser.error(f"--plot redraws saved results, and {path} does not exist")
        summary = summarise(json.loads(path.read_text())["rows"])
        figure(summary, ENCODERS, f"Code MCC against N at matched L0 (known D), {settings['seeds']} seed(s)", name)
        (RESULTS / f"{name}.md").write_text(table(summary, ENCODERS) + "\n")
        print(table(summary, ENCODERS))
        return
    if path.exists():
        # cells computed with the same per-cell settings are kept, whatever grid and seeds they came from:
        # a rerun with more seeds or a wider grid adds only the missing cells
        previous = json.loads(path.read_text())
        if _per_cell(previous["protocol"]) == _per_cell(protocol):
            rows = previous["rows"]
            print(f"resuming from {path}: {len(rows)} rows")
    done = {(r["n_atoms"], r["d"], r["k"], r["seed"]) for r in rows}
    start = time.time()
    for k, d, n_atoms, seed in itertools.product(settings["k"], settings["d"], settings["n_atoms"],
                                                 range(settings["seeds"])):
        if (n_atoms, d, k, seed) in done:
            continue
        if k > n_atoms:
            continue
        new = run_cell(n_atoms, d, k, seed, settings, ENCODERS)
        rows.extend(new)
        print(f"K={k} M={d} N={n_atoms} seed {seed}: " + ", ".join(
            f"{r['encoder']} {r['code_mcc']:.3f}" if "code_mcc" in r else f"{r['encoder']} skipped" for r in new),
            flush=True)
        summary = summarise(rows)
        grid = {key: sorted({r[key] for r in rows}) for key in ("n_atoms", "d", "k")}
        save(name, {"protocol": {**protocol, **grid, "seeds": max(r["seed"] for r in rows) + 1,
                                 "minutes": (time.time() - start) / 60}, "rows": rows,
                    "summary": summary}, table(summary, ENCODERS))
    summary = summarise(rows)
    figure(summary, ENCODERS, f"Code MCC against N at matched L0 (known D), {settings['seeds']} seed(s)", name)
    print(table(summary, ENCODERS))
    print(f"saved {path} in {(time.time() - start) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
