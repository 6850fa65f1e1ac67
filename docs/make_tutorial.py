"""Run docs/tutorial.md's steps and write its figures (docs/tutorial/*.png) and tables (docs/tutorial/*.md).

    python docs/make_tutorial.py            # `make tutorial`; about 10 minutes on a busy 2-core CPU

Work files (activation store, SAE) go to runs/tutorial/ and are reused on a rerun.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import sparsecode as sc
from sparsecode import activations as act
from sparsecode.defaults import lam_max as default_lam_max
from sparsecode.sae_formats import load_sae_dictionary

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "tutorial"
WORK = ROOT / "runs" / "tutorial"
LAYER, TOKENS, TRAIN, TEST, N_ATOMS, K, STEPS = 15, 3000, 2500, 500, 1152, 32, 300


def sh(*args: str) -> None:
    """One step of the tutorial, as the reader types it (the venv's `sparsecode`)."""
    exe = Path(sys.executable).parent / "sparsecode"
    print("$ sparsecode", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([str(exe), *args], check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    store, sae, folder = WORK / "acts", WORK / "sae", WORK / "sae-saelens"
    # 1-3: activations, a TopK SAE trained on them, and the SAE as a SAELens folder ("your SAE")
    if not (store / "manifest.json").is_file() or act.ActivationStore(store).n_tokens < TOKENS:
        sh("extract", "--out", str(store), "--layer", str(LAYER), "--n-tokens", str(TOKENS))
    if not (WORK / "sae-encoder.safetensors").is_file():
        sh("train", "--method", "topk", "--n-atoms", str(N_ATOMS), "--set", f"k={K}", "--set", f"steps={STEPS}",
           "--data", f"activations:{store}", "--n-samples", str(TRAIN), "--out", str(sae))
    if not (folder / "cfg.json").is_file():
        sh("export", "--encoder", f"{sae}-encoder.safetensors", "--out", str(folder))

    # 4: the amortisation gap on held-out tokens: the SAE's encoder against OMP and FISTA on its decoder
    D = load_sae_dictionary(folder)
    x = act.ActivationStore(store).load(TEST, start=TRAIN)            # raw: the export folded the scale in
    own = sc.get_encoder("sae-file").fit(D)
    # k=32 for OMP (the SAE's own L0); FISTA at the lam derived from the data (calibrating it to L0 32
    # means small lams, where it needs thousands of iterations: too slow for a tutorial on a CPU)
    gap = sc.compare([own, "omp", "fista"], x, D, k=K, reference=None)
    print(gap.to_text(width=None), flush=True)
    keep = ("encoder", "k", "lam", "fvu", "l0", "dead", "signals_per_s")
    lines = ["| " + " | ".join(keep) + " |", "|---|" + "---:|" * (len(keep) - 1)]
    for r in gap.rows:
        lines.append("| " + " | ".join(f"`{r[c]}`" if c == "encoder" else sc_fmt(r.get(c)) for c in keep) + " |")
    (DOCS / "gap.md").write_text("\n".join(lines) + "\n")

    # the trade-off behind the table: FVU against L0 for OMP over k and FISTA over lam, the SAE as a point
    curves = {"omp": [], "fista": []}
    for k in (4, 8, 16, 32, 64):
        r = sc.compare(["omp"], x, D, k=k, reference=None).rows[0]
        curves["omp"].append((r["l0"], r["fvu"]))
    lam_max = float(default_lam_max(x, D).median())
    for frac in (0.3, 0.1, 0.03):
        r = sc.compare(["fista"], x, D, lam=frac * lam_max, reference=None).rows[0]
        curves["fista"].append((r["l0"], r["fvu"]))
    own_row = gap.row(gap.rows[0]["encoder"])
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for (name, pts), marker in zip(curves.items(), "os"):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{name} (on the SAE's decoder)")
    ax.scatter([own_row["l0"]], [own_row["fvu"]], color="k", marker="*", s=150, zorder=5, label="the SAE's own encoder")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title(f"SmolLM2 layer {LAYER}: {TEST} held-out tokens, {N_ATOMS} latents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "fvu_vs_l0.png", dpi=110)

    # 5: the CE splice: each encoder's reconstructions put back into the model
    loaded = act.load_model(None)
    _, docs = act.read_corpus(None)
    omp = sc.get_encoder("omp", k=K).fit(D)
    fista = sc.get_encoder("fista", lam=gap.row("fista")["lam"]).fit(D)
    ce = {}
    for name, enc in (("sae-file", own), ("omp", omp), ("fista", fista)):
        ev = act.evaluate(loaded, enc, D, docs[-8:], layer=LAYER, n_tokens=512)
        ev.pop("firing_rates")
        ce[name] = ev
        print(name, {k: round(v, 4) for k, v in ev.items()}, flush=True)
    keys = ("ce_clean", "ce_spliced", "ce_increase", "ce_recovered", "fvu")
    lines = ["| encoder | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| `{n}` | " + " | ".join(f"{ev[k]:.3f}" for k in keys) + " |" for n, ev in ce.items()]
    (DOCS / "ce.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    names = list(ce)
    ax.bar(names, [ce[n]["ce_increase"] for n in names], color=["0.4", "tab:blue", "tab:orange"],
           label="CE increase over the clean model")
    ax.set_ylabel("CE increase (nats per token)")
    ax.set_xlabel("encoder (on the SAE's decoder)")
    ax.set_title("Reconstructions spliced into the model: 512 held-out tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "ce_increase.png", dpi=110)
    (DOCS / "run.json").write_text(json.dumps({"tokens": TOKENS, "train": TRAIN, "test": TEST, "n_atoms": N_ATOMS,
                                               "k": K, "steps": STEPS, "layer": LAYER}, indent=1))


def sc_fmt(value) -> str:
    from sparsecode.table import format_value
    return format_value(value)


if __name__ == "__main__":
    np.seterr(all="ignore")
    torch.manual_seed(0)
    main()
