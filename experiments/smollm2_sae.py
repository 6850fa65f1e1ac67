"""Worked example on real activations: SmolLM2-135M-Instruct (embedded GGUF), residual stream at
the middle layer.

1. Extract activations from the Python documentation that ships with Python (resumable store).
2. Learn a TopK SAE dictionary and a binary TopK (paper a) one on the normalised activations.
3. On held-out tokens, compare encoders on the TopK SAE's dictionary — its own encoder, OMP at the
   same k, FISTA calibrated to the same mean L0 — and the binary SAE on its own dictionary.
4. Splice each reconstruction into the model: CE increase and fraction of CE recovered; firing-rate
   histograms.

CPU-sized by default (16 minutes on 2 cores); `--quick` runs the whole story on a small budget
(2,000 tokens, 576 atoms, 100 training steps, 256 evaluation tokens; written to runs/llm-quick,
not over the committed results) in minutes. The same script scales on a GPU with flags only:
    python experiments/smollm2_sae.py --tokens 2000000 --n-atoms 16384 --steps 20000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparsecode as sc
from sparsecode import activations as act
from sparsecode.plots import firing_histogram
from _common import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=40_000, help="activations to extract")
    parser.add_argument("--n-atoms", type=int, default=2304, help="dictionary size (4x d=576 by default)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm")
    parser.add_argument("--reuse", action="store_true", help="load the SAEs a previous run saved instead of training")
    parser.add_argument("--quick", action="store_true",
                        help="a small budget: 2,000 tokens, 576 atoms, 100 steps, 256 evaluation tokens, "
                             "results in runs/llm-quick")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.n_atoms, args.steps, args.eval_tokens = 2000, 576, 100, 256
        if args.out == RESULTS / "llm":
            args.out = Path("runs/llm-quick")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = sc._validation.resolve_device(args.device)
    t0 = time.perf_counter()

    loaded = act.load_model(None, device=device)
    corpus, docs = act.read_corpus(None)
    held_out = docs[-8:]                      # evaluation text (about 11k tokens) never seen in training
    stats = act.extract(loaded, corpus, docs[:-8], out / "store",
                        act.ExtractConfig(layer=args.layer, n_tokens=args.tokens, batch_size=8), measure_overhead=True)
    scale = act.compute_normalization(out / "store")
    extraction = out / "extraction.json"
    if stats.tokens:                       # a resumed, already complete store keeps the first run's figures
        extraction.write_text(json.dumps({"tokens_per_s": stats.tokens_per_s, "bare_tokens_per_s":
                                          stats.bare_tokens_per_s, "overhead": stats.overhead, "tokens": stats.tokens}))
    extracted = json.loads(extraction.read_text()) if extraction.is_file() else {}
    store = act.ActivationStore(out / "store")
    n_test = min(4096, store.n_tokens // 5)
    x_train = torch.cat([b.x for b in store.batches(8192, shuffle=True, seed=0, normalize=True,
                                                    max_tokens=store.n_tokens - n_test)])
    x_test = store.load(n_test, start=store.n_tokens - n_test, normalize=True).x.to(device)
    print(f"extracted {extracted.get('tokens', 0)} tokens at {extracted.get('tokens_per_s', 0):,.0f} tok/s "
          f"(bare forward {extracted.get('bare_tokens_per_s') or 0:,.0f} tok/s); scale {scale:.4g}", flush=True)

    train = {"steps": args.steps, "batch_size": 1024, "k": args.k}
    if args.reuse and (out / "topk-encoder.safetensors").is_file() and (out / "binary-encoder.safetensors").is_file():
        topk, binary = (sc.LearnedDictionary(e.dictionary, e) for e in
                        (sc.load_encoder(out / "topk-encoder.safetensors"), sc.load_encoder(out / "binary-encoder.safetensors")))
        print("reusing the trained SAEs", flush=True)
    else:
        topk = sc.learn_dictionary(x_train.to(device), "topk", args.n_atoms, lr=1e-3, **train)
        binary = sc.learn_dictionary(x_train.to(device), "binary-topk", args.n_atoms, **train)
        topk.dictionary.save(out / "topk-dictionary")
        topk.encoder.save(out / "topk-encoder")
        binary.encoder.save(out / "binary-encoder")
        print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)

    shared = sc.compare([topk.encoder, "omp", "fista"], x_test, topk.dictionary, k=args.k,
                        encoder_params={"fista": {"lam": 0.05}}, reference=None, device=device)
    fista = sc.calibrate("fista", topk.dictionary.to(device), x_test[:1024], float(args.k))[0]
    rows = [{**r, "dictionary": "topk SAE"} for r in shared.rows if r["encoder"] != "fista"]
    rows += [{**sc.compare([fista], x_test, topk.dictionary, reference=None, device=device).rows[0],
              "dictionary": "topk SAE"}]
    rows += [{**sc.compare([binary.encoder], x_test, binary.dictionary, reference=None, device=device).rows[0],
              "encoder": "binary-topk", "dictionary": "binary SAE"}]

    on_model = {"topk": (topk.encoder, topk.dictionary), "omp": (sc.get_encoder("omp", k=args.k).fit(topk.dictionary),
                                                                 topk.dictionary),
                "fista": (fista, topk.dictionary), "binary-topk": (binary.encoder, binary.dictionary)}
    for row in rows:
        enc, dictionary = on_model[row["encoder"]]
        ev = act.evaluate(loaded, enc, dictionary.to(device), held_out, layer=args.layer, n_tokens=args.eval_tokens,
                          scale=scale)
        firing_histogram(ev.firing_rates, out / f"firing-{row['encoder']}.png", title=row["encoder"])
        row.update({f"model_{k}": v for k, v in ev.metrics().items()})
        print(f"{row['encoder']}: FVU {row['fvu']:.3f} L0 {row['l0']:.1f} CE +{ev.ce_increase:.3f} "
              f"recovered {ev.ce_recovered:.3f}", flush=True)

    keys = ("fvu", "l0", "dead", "dense", "model_ce_clean", "model_ce_spliced", "model_ce_increase",
            "model_ce_recovered", "model_dense_10", "model_dense_50", "signals_per_s")
    lines = ["| encoder | dictionary | FVU | L0 | dead | >50% | CE clean | CE spliced | CE increase | CE recovered "
             "| >10% (model) | >50% (model) | signals/s |", "|---|---|" + "---:|" * 11]
    for r in rows:
        lines.append(f"| `{r['encoder']}` | {r['dictionary']} | " + " | ".join(
            f"{r[k]:,.0f}" if k == "signals_per_s" else f"{r[k]:.3f}" for k in keys) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "model": loaded.name, "layer": args.layer, "tokens": store.n_tokens, "n_atoms": args.n_atoms, "k": args.k,
        "steps": args.steps, "extraction": extracted,
        "rows": rows}, indent=2, default=float))
    print(table)
    print(f"done in {time.perf_counter() - t0:.0f}s; results in {out}")


if __name__ == "__main__":
    main()
