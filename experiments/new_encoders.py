"""The new encoders beside topk, FISTA and OMP.

(a) Paper c's known-D problem (N=16 atoms, M=8 dimensions, K=3 non-zeros, 1,024 training and 1,024
    test signals per seed): every encoder infers codes on the true dictionary, each knob calibrated
    by `compare(target_l0=K)`: k searched, lam bisected, and for the SAE variants with an inference
    threshold (batch-topk, matryoshka, jumprelu, gated) one training, then that threshold bisected.
    A row is "matched" when its mean L0 is within calibration's tolerance of K (max(2% of K, 0.05));
    unmatched rows are reported as measured, never dropped.
(b) SmolLM2-135M-Instruct (embedded GGUF) residual stream at layer 15: each new trainable encoder
    and TopK learns its own dictionary from the same training tokens (same steps, batch, seed);
    held-out FVU, L0 and dead fraction on that dictionary, all at L0 about k=32. k-knobbed methods
    train at k=32; JumpReLU's and gated's penalties are found by bisection on log(penalty) over
    trainings of the same budget (`penalty_for_l0`). Then every encoder with an inference threshold
    has it calibrated on the training tokens to L0 = 32 (`calibrate_inference`).

    python experiments/new_encoders.py [--quick]

`--quick` (2 seeds, 300 steps; 4,000 tokens, 576 atoms, 300 steps) takes minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import sparsecode as sc
from sparsecode import activations as act
from _common import RESULTS, at_least_one, summarise
from sparsecode.compare import Unreachable, calibrate_inference

N, M, K = 16, 8, 3
BASELINES = ["topk", "fista", "omp"]
NEW_KNOWN_D = ["admm", "cd", "lca", "gradient-pursuit", "alista", "mp-sae",
               "jumprelu", "batch-topk", "matryoshka", "gated"]
TRAINABLE = ["topk", "jumprelu", "batch-topk", "matryoshka", "gated"]
KNOWN_D_KEYS = ("code_mcc", "fvu", "l0", "flops_per_signal")
#: trainings the penalty search of a penalty-knobbed encoder may run (SmolLM2 part)
PENALTY_TRIES = 6
#: the search stops once a training's L0 is within this factor of the target (the threshold does the rest)
PENALTY_BAND = 1.25


def known_d(seeds: int, steps: int) -> list[dict]:
    encoders = BASELINES + NEW_KNOWN_D
    trained = {name for name in encoders if sc.registry.encoder_class(name).trainable}
    params = {name: {"steps": steps} for name in trained}
    tol = max(0.02 * K, 0.05)                # `calibrate`'s default tolerance at this target
    rows = []
    for seed in range(seeds):
        data = sc.synthetic.make_sparse_data(n_samples=2048, d=M, n_atoms=N, k=K, seed=seed)
        train, test = data.split(1024)
        t0 = time.perf_counter()
        res = sc.compare(encoders, test, target_l0=K, x_train=train.x, encoder_params=params, seed=seed,
                         reference=None, device="cpu")
        for row in res.rows:
            matched = "l0" in row and abs(row["l0"] - K) <= tol
            rows.append({"seed": seed, "matched": matched, **row})
        print(f"known D, seed {seed} ({time.perf_counter() - t0:.0f}s): " + ", ".join(
            f"{r['encoder']} mcc {r['code_mcc']:.3f} L0 {r['l0']:.2f}" if "l0" in r else f"{r['encoder']} skipped"
            for r in res.rows), flush=True)
    return rows


def calibrated_knob(name: str, mine: list[dict]) -> str:
    """The knob calibration set (the inference threshold where the encoder has one), mean over seeds."""
    cls = sc.registry.encoder_class(name)
    knob = cls.inference_knob or cls.knob
    values = [r[knob] for r in mine if r.get(knob) is not None]
    if not values:
        return ""
    mean = sum(values) / len(values)
    return f"`{knob}` {mean:.3g}" if knob != "k" else f"`k` {mean:g}"


def known_d_table(rows: list[dict]) -> str:
    summary = summarise([r for r in rows if "l0" in r], KNOWN_D_KEYS)
    lines = ["| encoder | calibrated | matched L0 | code MCC | FVU | L0 | FLOPs/signal |",
             "|---|---|---|---:|---:|---:|---:|"]
    for entry in summary:
        mine = [r for r in rows if r["encoder"] == entry["encoder"]]
        matched = sum(r["matched"] for r in mine)
        cells = [f"{entry[k]:.3f} ± {entry[k + '_std']:.3f}" for k in ("code_mcc", "fvu", "l0")]
        lines.append(f"| `{entry['encoder']}` | {calibrated_knob(entry['encoder'], mine)} | "
                     f"{'yes' if matched == len(mine) else f'{matched}/{len(mine)} seeds'} | "
                     + " | ".join(cells) + f" | {entry['flops_per_signal']:,.0f} |")
    for r in rows:
        if "l0" not in r:
            lines.append(f"| `{r['encoder']}` | | skipped (seed {r['seed']}): {r.get('skipped', '')} | | | | |")
    return "\n".join(lines)


def penalty_for_l0(method: str, x_train, n_atoms: int, target: float, params: dict, scale: float) -> tuple:
    """The penalty of a penalty-knobbed encoder whose training gives L0 about `target`: bisection on
    log(penalty) between the config's default and 1,000 times it, each point one training with the
    experiment's budget, L0 measured on the training tokens with the inference threshold as trained.
    Stops within a factor PENALTY_BAND of the target, after PENALTY_TRIES trainings, or at once when the
    largest penalty still trains denser than the target (then the inference threshold does the rest).
    Returns the learned dictionary and encoder nearest the target, and every training tried."""
    cls = sc.registry.encoder_class(method)
    knob = cls.knob
    tried, learned = [], {}

    def train(value: float) -> float:
        t0 = time.perf_counter()
        learned[value] = sc.learn_dictionary(x_train, method, n_atoms, seed=0, input_scale=scale,
                                             **{**params, knob: value})
        l0 = sc.metrics.mean_l0(learned[value].encoder.encode(x_train))
        tried.append({knob: value, "train_l0": l0, "train_s": time.perf_counter() - t0})
        print(f"  {method} {knob}={value:.4g}: L0 {l0:.1f} after training", flush=True)
        return l0

    def near(l0: float) -> bool:
        return target / PENALTY_BAND <= l0 <= target * PENALTY_BAND

    lo = cls.Config.__dataclass_fields__[knob].default
    hi = 1000 * lo
    if not near(train(lo)) and tried[-1]["train_l0"] > target and train(hi) < target:
        while len(tried) < PENALTY_TRIES and not near(tried[-1]["train_l0"]):
            mid = math.sqrt(lo * hi)
            if train(mid) > target:
                lo = mid
            else:
                hi = mid
    best = min(tried, key=lambda t: abs(math.log(t["train_l0"] / target)) if t["train_l0"] > 0 else math.inf)
    return learned[best[knob]], best[knob], tried


def smollm2(tokens: int, n_atoms: int, steps: int, k: int, store_dir: Path) -> dict:
    loaded = act.load_model(None, device="cpu")
    corpus, docs = act.read_corpus(None)
    t0 = time.perf_counter()
    act.extract(loaded, corpus, docs[:-8], store_dir, act.ExtractConfig(layer=15, n_tokens=tokens, batch_size=8))
    scale = act.compute_normalization(store_dir)
    store = act.ActivationStore(store_dir)
    n_test = store.n_tokens // 5
    x_train = store.load(store.n_tokens - n_test, start=0, normalize=True).x
    x_test = store.load(n_test, start=store.n_tokens - n_test, normalize=True).x
    print(f"store: {store.n_tokens} tokens ({time.perf_counter() - t0:.0f}s), scale {scale:.4g}", flush=True)
    rows = []
    for method in TRAINABLE:
        cls = sc.registry.encoder_class(method)
        t1 = time.perf_counter()
        params = {"steps": steps, "batch_size": 256, "lr": 1e-3}
        tried = []
        if cls.knob == "k":
            params["k"] = k
            learned = sc.learn_dictionary(x_train, method, n_atoms, seed=0, input_scale=scale, **params)
        else:
            learned, params[cls.knob], tried = penalty_for_l0(method, x_train, n_atoms, k, params, scale)
        enc = learned.encoder
        train_l0 = sc.metrics.mean_l0(enc.encode(x_train))
        threshold = None
        if cls.inference_knob is not None:
            try:
                enc, _ = calibrate_inference(enc, x_train, k)
            except Unreachable as err:       # trained sparser than k at its densest threshold: kept as trained
                print(f"  {method}: {err}", flush=True)
            threshold = getattr(enc.config, cls.inference_knob)
        train_s = time.perf_counter() - t1
        row = sc.compare([enc], x_test, learned.dictionary, reference=None, device="cpu").rows[0]
        rows.append({"encoder": method, "params": params, "knob": cls.knob, "penalty_search": tried,
                     "train_l0": train_l0, "inference_knob": cls.inference_knob, "threshold": threshold,
                     "train_s": train_s, **{key: row[key] for key in ("fvu", "l0", "dead", "dense")}})
        print(f"{method}: FVU {row['fvu']:.3f} L0 {row['l0']:.1f} dead {row['dead']:.3f} ({train_s:.0f}s)", flush=True)
    return {"model": loaded.name, "layer": 15, "tokens": store.n_tokens, "train_tokens": store.n_tokens - n_test,
            "test_tokens": n_test, "n_atoms": n_atoms, "steps": steps, "k": k, "rows": rows}


def smollm2_table(result: dict) -> str:
    lines = ["| encoder | trained at | L0 after training | inference threshold | FVU | L0 | dead | train s |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        knob = r["knob"]
        trained = f"`{knob}`={r['params'][knob]:.4g}"
        if r["penalty_search"]:
            trained += f" ({len(r['penalty_search'])} trainings searched)"
        threshold = "" if r["inference_knob"] is None else f"`{r['inference_knob']}`={r['threshold']:.3g}"
        lines.append(f"| `{r['encoder']}` | {trained} | {r['train_l0']:.1f} | {threshold} | {r['fvu']:.3f} | "
                     f"{r['l0']:.1f} | {r['dead']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=at_least_one, default=3, help="seeds of the known-D problem")
    parser.add_argument("--steps", type=at_least_one, default=2000, help="training steps of trained methods")
    parser.add_argument("--tokens", type=at_least_one, default=20_000, help="SmolLM2 activations to extract")
    parser.add_argument("--n-atoms", type=at_least_one, default=2304, help="atoms of each SmolLM2 dictionary")
    parser.add_argument("--k", type=at_least_one, default=32, help="k of the k-knobbed SmolLM2 encoders")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 300 steps; 4,000 tokens and 576 atoms: minutes on 2 CPU cores")
    parser.add_argument("--store", type=Path, default=Path(__file__).resolve().parents[1] / "runs/new-encoders/store",
                        help="the activation store (extracted once, resumed after)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.tokens, args.n_atoms = 2, 300, 4000, 576
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    rows = known_d(args.seeds, args.steps)
    known_s = time.perf_counter() - t0
    llm = smollm2(args.tokens, args.n_atoms, args.steps, args.k, args.store)
    total_s = time.perf_counter() - t0
    load = os.getloadavg()
    payload = {"command": "python experiments/new_encoders.py" + (" --quick" if args.quick else ""),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "load_average_at_end": load, "known_d_s": known_s, "total_s": total_s,
               "known_d": {"protocol": {"N": N, "M": M, "K": K, "target_l0": K, "seeds": args.seeds,
                                        "steps": args.steps}, "rows": rows},
               "smollm2": llm}
    tables = (f"### Known D (N={N}, M={M}, K={K}), target L0 {K}, {args.seeds} seeds, mean ± std\n\n"
              f"{known_d_table(rows)}\n\n### SmolLM2 layer 15, {llm['n_atoms']} atoms, {llm['steps']} steps, "
              f"{llm['train_tokens']} training / {llm['test_tokens']} held-out tokens\n\n{smollm2_table(llm)}\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "new_encoders.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    md = RESULTS / "new_encoders.md"
    md_tmp = md.with_suffix(".md.tmp")
    md_tmp.write_text(tables)
    md_tmp.replace(md)
    print(tables)
    print(f"done in {total_s:.0f}s (known D {known_s:.0f}s); load average {load[0]:.2f}; saved {path}")


if __name__ == "__main__":
    main()
