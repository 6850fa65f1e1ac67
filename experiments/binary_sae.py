"""Paper a on SmolLM2: why our binary TopK SAE has dead latents, and its transcoders.

1. Ablation on the residual stream (layer 15): a TopK SAE and the binary TopK SAE at the same
   budget, then the binary SAE with one ingredient changed at a time: the training budget, the
   learning-rate rule (paper a's 3e-3 / sqrt(n_atoms / 2^15) uncapped, smaller Signum steps, Adam),
   the threshold initialisation, the per-atom decode scale, the normalisation of the activations
   and the temperature of the sigmoid straight-through gradient. Dead = never fires on the
   held-out tokens; ultra-frequent = fires on more than half of them.
2. Transcoders on the MLP site of the same layer (input: MLP input, target: MLP output): TopK
   transcoder, binary transcoder (BTC) and binary skip-transcoder, FVU of the MLP output, on the
   normalised activations and on the raw ones.
3. The firing-rate histograms of all of them in one figure.

The stores are extracted once into --cache and reused (the extraction re-tokenises the corpus).

    python experiments/binary_sae.py                  # 1152 atoms, 200 steps, 20k tokens (about 30 min, 2 busy cores)
    python experiments/binary_sae.py --quick          # 576 atoms, 100 steps, results in runs/binary-sae-quick
    python experiments/binary_sae.py --redo-transcoders   # only the transcoders again, with their CE
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
from sparsecode import activations as act  # noqa: E402
from _common import RESULTS  # noqa: E402
from _llm import HELD_OUT_DOCS, LAYER, ensure_stores  # noqa: E402

K = 32
BATCH = 512


def paper_lr(n_atoms: int) -> float:
    """Paper a's learning rate of binary coders, without our cap at 3e-3."""
    return 3e-3 / math.sqrt(n_atoms / 2 ** 15)


def ablations(n_atoms: int, steps: int) -> dict[str, dict]:
    """label -> (binary-topk config changes, data choice); the first row is our default."""
    return {
        "default (Signum 3e-3, theta 0.004, T 2, decode scale, normalised)": {},
        f"budget x2 ({2 * steps} steps)": {"steps": 2 * steps},
        f"paper's lr rule uncapped ({paper_lr(n_atoms):.2g})": {"lr": paper_lr(n_atoms)},
        "Signum lr 3e-4": {"lr": 3e-4},
        "Adam lr 1e-3": {"optimizer": "adam", "lr": 1e-3},
        "threshold init 0.04": {"theta_init": 0.04},
        "no decode scale (0/1 on unit atoms)": {"decode_scale": False},
        "raw activations (not normalised)": {"raw": True},
        "raw activations, Signum lr 3e-4": {"raw": True, "lr": 3e-4},
        "temperature 0.05": {"temperature": 0.05},
    }


def rates_of(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).double().mean(0)


def summary(label: str, kind: str, codes: torch.Tensor, fvu: float, seconds: float, seed: int = 0) -> dict:
    r = rates_of(codes)
    return {"model": label, "seed": seed, "kind": kind, "fvu": fvu, "l0": float((codes != 0).sum(1).double().mean()),
            "dead": float((r == 0).double().mean()), "dense_50": float((r > 0.5).double().mean()),
            "dense_10": float((r > 0.1).double().mean()), "seconds": seconds, "firing_rates": r.tolist()}


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return sc.metrics.fvu(y, y_hat)


#: the rows trained again at other seeds (`--add-seed`): the reference, the default and the two fixes
KEY_ROWS = ("default", "Adam lr 1e-3", "raw activations (not normalised)")


def _split(store_path: Path) -> tuple[act.ActivationStore, int, int]:
    """The store (its normalisation computed once) and its training / held-out token counts."""
    store = act.ActivationStore(store_path)
    if "normalization" not in store.manifest:
        act.compute_normalization(store_path)
        store = act.ActivationStore(store_path)
    n_test = min(4096, store.n_tokens // 5)
    return store, store.n_tokens - n_test, n_test


def run_sae(store_path: Path, n_atoms: int, steps: int, quick: bool, models: Path | None, seed: int = 0) -> list[dict]:
    """The TopK SAE and every binary variant at seed 0; at another seed the TopK SAE and `KEY_ROWS` only."""
    store, n_train, n_test = _split(store_path)
    data = {norm: (store.load(n_train, normalize=norm).x, store.load(n_test, start=n_train, normalize=norm).x)
            for norm in (True, False)}
    train = {"steps": steps, "batch_size": BATCH, "k": K, "seed": seed}
    models = models if seed == 0 else None
    rows = []
    t0 = time.perf_counter()
    x_train, x_test = data[True]
    topk = sc.learn_dictionary(x_train, "topk", n_atoms, lr=1e-3, **train)
    codes = topk.encoder.encode(x_test)
    rows.append(summary("TopK SAE (Adam 1e-3)", "sae", codes, fvu(x_test, topk.dictionary.decode(codes)),
                        time.perf_counter() - t0, seed))
    print(_line(rows[-1]), flush=True)
    if models is not None:
        models.mkdir(parents=True, exist_ok=True)
        topk.dictionary.save(models / "topk-dictionary")
        topk.encoder.save(models / "topk-encoder")
    for label, change in ablations(n_atoms, steps).items():
        if seed and not label.startswith(KEY_ROWS):
            continue
        change = dict(change)
        raw = change.pop("raw", False)
        x_train, x_test = data[not raw]
        t0 = time.perf_counter()
        learned = sc.learn_dictionary(x_train, "binary-topk", n_atoms, **{**train, **change})
        codes = learned.encoder.encode(x_test)
        rows.append(summary(f"binary SAE: {label}", "sae", codes, fvu(x_test, learned.dictionary.decode(codes)),
                            time.perf_counter() - t0, seed))
        print(_line(rows[-1]), flush=True)
        if models is not None:
            learned.encoder.save(models / f"binary-{len(rows) - 2}")      # probing.py reads them
    return rows


def run_transcoders(store_path: Path, n_atoms: int, steps: int, quick: bool, lr: float | None,
                    normalize: bool = True, eval_tokens: int = 0) -> list[dict]:
    """The three transcoders, on activations normalised to unit mean squared norm or (``normalize=False``,
    labels marked so) on the raw ones, where Signum's steps are small against the pre-activations.
    With `eval_tokens`, each is also spliced into the model in place of the MLP over that many tokens of
    the held-out documents (`act.evaluate`): the CE increase over the clean model."""
    store, n_train, n_test = _split(store_path)
    tr = store.load(n_train, normalize=normalize, targets=True)
    te = store.load(n_test, start=n_train, normalize=normalize, targets=True)
    mark = "" if normalize else ", raw activations"
    train = {"steps": steps, "batch_size": BATCH, "k": K}
    binary = {} if lr is None else {"lr": lr}
    rows = []
    for label, method, params in (("TopK transcoder (Adam 1e-3)", "topk", {"lr": 1e-3}),
                                  ("binary transcoder (BTC)", "binary-topk", binary),
                                  ("binary skip-transcoder", "binary-topk", {**binary, "skip": True})):
        t0 = time.perf_counter()
        learned = sc.learn_dictionary(tr.x, method, n_atoms, y=tr.y, **{**train, **params})
        codes = learned.encoder.encode(te.x)
        y_hat = learned.dictionary.decode(codes)
        skip = getattr(learned.encoder, "skip_term", None)
        if skip is not None and skip(te.x) is not None:
            y_hat = y_hat + skip(te.x)
        rows.append(summary(label + mark, "transcoder", codes, fvu(te.y, y_hat), time.perf_counter() - t0))
        if eval_tokens:
            loaded, held_out = _model_and_held_out()
            ev = act.evaluate(loaded, learned.encoder, learned.dictionary, held_out, layer=LAYER, site="mlp",
                              n_tokens=eval_tokens, scale=store.scale if normalize else 1.0)
            rows[-1].update(ce_clean=ev.ce_clean, ce_spliced=ev.ce_spliced, ce_increase=ev.ce_increase,
                            ce_recovered=ev.ce_recovered)
        print(_line(rows[-1]), flush=True)
    return rows


_MODEL: list = []


def _model_and_held_out():
    """The embedded SmolLM2 and the documents no store saw (loaded once)."""
    if not _MODEL:
        _, docs = act.read_corpus(None)
        _MODEL.append((act.load_model(None, device="cpu"), docs[-HELD_OUT_DOCS:]))
    return _MODEL[0]


def _line(row: dict) -> str:
    ce = f" CE +{row['ce_increase']:.3f}" if "ce_increase" in row else ""
    return (f"{row['model']}: FVU {row['fvu']:.3f} L0 {row['l0']:.1f} dead {row['dead']:.3f} "
            f">50% {row['dense_50']:.3f} >10% {row['dense_10']:.3f}{ce} ({row['seconds']:.0f}s)")


def fewest_dead(rows: list[dict]) -> dict | None:
    """The seed-0 binary SAE with the fewest dead latents among those reconstructing at least as well
    as the default (a variant that kills nothing but learns nothing is no fix)."""
    binaries = [r for r in rows if r["model"].startswith("binary SAE") and r.get("seed", 0) == 0]
    if not binaries:
        return None
    return min((r for r in binaries if r["fvu"] <= binaries[0]["fvu"]), key=lambda r: r["dead"])


def histogram_figure(rows: list[dict], path: Path, title: str) -> None:
    """Log firing-rate histograms, one panel per model family, the dead count in each legend."""
    rows = [r for r in rows if r.get("seed", 0) == 0]
    panels = {"sae": [r for r in rows if r["kind"] == "sae"], "transcoder": [r for r in rows if r["kind"] == "transcoder"]}
    pick = {"sae": [r for r in panels["sae"] if r["model"].startswith(("TopK", "binary SAE: default"))]}
    best = fewest_dead(panels["sae"])
    if best is not None and best not in pick["sae"]:
        pick["sae"].append(best)
    pick["transcoder"] = panels["transcoder"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.linspace(-4, 0, 41)
    for ax, (kind, chosen) in zip(axes, pick.items()):
        for r in chosen:
            rates = np.asarray(r["firing_rates"])
            alive = rates[rates > 0]
            ax.hist(np.log10(alive), bins=bins, histtype="step", lw=1.5,
                    label=f"{r['model'][:48]} ({(rates == 0).sum()} dead)")
        for threshold, style in ((0.1, "--"), (0.5, ":")):
            ax.axvline(math.log10(threshold), color="grey", linestyle=style)
        ax.set_xlabel("log10 firing rate (fraction of held-out tokens)")
        ax.set_ylabel("latents")
        ax.set_title("residual-stream SAEs" if kind == "sae" else "MLP transcoders")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/llm-cache"),
                        help="folder of the extracted stores (reused between runs)")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--n-atoms", type=int, default=1152, help="dictionary size (2x d=576)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="576 atoms, 100 steps; results in runs/binary-sae-quick")
    parser.add_argument("--skip-ablation", action="store_true", help="transcoders only")
    parser.add_argument("--add-seed", type=int, default=0,
                        help="train the TopK SAE and the key binary rows at this seed and add them to the results")
    parser.add_argument("--redo-transcoders", action="store_true",
                        help="train the transcoders again (normalised and raw activations, with their CE) in place of "
                             "those in the saved results")
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="held-out tokens over which each transcoder is spliced into the model (0: no CE)")
    parser.add_argument("--replot", action="store_true", help="redraw the table and figure from the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = RESULTS / "binary_sae"
    if args.quick:
        args.n_atoms, args.steps = 576, 100
        out = Path("runs/binary-sae-quick")
    out.mkdir(parents=True, exist_ok=True)
    t0, load = time.perf_counter(), os.getloadavg()[0]
    if args.replot or args.add_seed or args.redo_transcoders:
        previous = json.loads((out / "results.json").read_text())
        protocol, rows = previous["protocol"], previous["rows"]
        if args.redo_transcoders:
            stores = ensure_stores(args.cache, args.tokens)
            rows = [r for r in rows if r["kind"] != "transcoder"]
            for normalize in (True, False):
                rows += run_transcoders(stores["mlp"], args.n_atoms, args.steps, args.quick, None, normalize,
                                        args.eval_tokens)
            protocol["transcoders"] = {"seconds": round(time.perf_counter() - t0), "load_average_at_start": load,
                                       "eval_tokens": args.eval_tokens}
        if args.add_seed:
            stores = ensure_stores(args.cache, args.tokens)
            rows += run_sae(stores["resid"], args.n_atoms, args.steps, args.quick, None, seed=args.add_seed)
            protocol.setdefault("added_seeds", []).append(
                {"seed": args.add_seed, "seconds": round(time.perf_counter() - t0), "load_average_at_start": load})
    else:
        stores = ensure_stores(args.cache, args.tokens)
        models = None if args.quick else args.cache / f"models-{args.tokens}-{args.n_atoms}"
        rows = [] if args.skip_ablation else run_sae(stores["resid"], args.n_atoms, args.steps, args.quick, models)
        for normalize in (True, False):
            rows += run_transcoders(stores["mlp"], args.n_atoms, args.steps, args.quick, None, normalize,
                                    args.eval_tokens)
        protocol = {"model": "SmolLM2-135M-Instruct (embedded GGUF)", "layer": 15, "tokens": args.tokens, "k": K,
                    "n_atoms": args.n_atoms, "steps": args.steps, "batch_size": BATCH,
                    "seconds": round(time.perf_counter() - t0), "load_average_at_start": load,
                    "cpus": os.cpu_count()}
    elapsed = time.perf_counter() - t0

    lines = ["| model | seeds | FVU | L0 | dead | fires on >50% | fires on >10% | CE increase | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cell = lambda key, fmt: (f"{np.mean([r[key] for r in mine]):{fmt}}" + (
            f" ± {np.std([r[key] for r in mine]):{fmt}}" if len(mine) > 1 else ""))
        lines.append(f"| {model} | {len(mine)} | {cell('fvu', '.3f')} | {cell('l0', '.1f')} | {cell('dead', '.3f')} | "
                     f"{cell('dense_50', '.3f')} | {cell('dense_10', '.3f')} | "
                     f"{cell('ce_increase', '.3f') if all('ce_increase' in r for r in mine) else ''} | "
                     f"{np.mean([r['seconds'] for r in mine]):.0f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    (out / "results.md").write_text(table + "\n")
    histogram_figure(rows, out / "firing.png", f"SmolLM2-135M layer 15, {args.n_atoms} latents, k={K}, "
                                               f"{args.steps} steps, {args.tokens:,} tokens")
    print(table)
    print(f"{elapsed:.0f}s (load average {load:.1f} on {os.cpu_count()} cores at the start); results in {out}")


if __name__ == "__main__":
    main()
