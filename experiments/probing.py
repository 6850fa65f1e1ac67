"""Sparse probing offline: k-sparse logistic probes on each encoder's codes, labels needing no network.

Labels of each stored SmolLM2 activation (layer 15, residual stream), from its token alone:
"is a digit", "starts a word" (the token begins with a space), "inside code" (its line starts with
'>>>' or an indent of four spaces, as the Python documentation's examples do), and for the three
most frequent documentation topics of the sample "from topic T" (one against the rest).

Probes as SAEBench: on a balanced training split, pick the k latents whose mean code differs most
between the two classes, fit a logistic regression on those k alone, report accuracy on the
held-out split; k in {1, 2, 5, 10, 20}; mean ± std over three splits. Encoders on the TopK SAE's
dictionary (its own encoder, OMP at k = 32, FISTA calibrated to the same mean L0, the binary TopK
encoder trained on that dictionary), the binary SAE on its own dictionary, and the raw activations
(the 576 neurons) as the baseline.

Run experiments/binary_sae.py first (it trains and caches the SAEs).

    python experiments/probing.py            # up to 600 + 600 tokens per task
    python experiments/probing.py --quick    # 200 + 200 tokens per task, k up to 10, results in runs/probing-quick
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import sparsecode as sc  # noqa: E402
from sparsecode import activations as act  # noqa: E402
from _common import RESULTS  # noqa: E402

KS = (1, 2, 5, 10, 20)
SPLITS = 3


def token_texts(ids: torch.Tensor) -> list[str]:
    from transformers import AutoTokenizer
    path = act.embedded_model_file()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return [tok.decode([int(i)]) for i in ids]


def labels(texts: list[str], topics: torch.Tensor, topic_names: list[str], row_len: int = 127) -> dict[str, np.ndarray]:
    """Task name -> label per token: 1, 0, or -1 where the label is unknown (left out)."""
    n = len(texts)
    digit = np.array([t.strip().isdigit() for t in texts], dtype=int)
    word = np.array([t[:1] == " " and t.strip() != "" for t in texts], dtype=int)
    code = np.full(n, -1)
    for start in range(0, n, row_len):           # a stored row is one context: lines are followed inside it
        line, known = "", False
        for i in range(start, min(start + row_len, n)):
            if known:
                code[i] = int(line.startswith((">>>", "    ")))
            text = texts[i]
            if "\n" in text:
                line, known = text.rsplit("\n", 1)[1], True
            else:
                line += text
    out = {"is a digit": digit, "starts a word": word, "inside code": code}
    counts = torch.bincount(topics)
    for t in counts.argsort(descending=True)[:3].tolist():
        out[f"topic '{topic_names[t]}'"] = (topics == t).numpy().astype(int)
    return out


def balanced(label: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced train and test indices (70/30) of up to `per_class` tokens of each class."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(label == 1), np.flatnonzero(label == 0)
    m = min(per_class, len(pos), len(neg))
    pos, neg = rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)
    cut = int(0.7 * m)
    return np.concatenate([pos[:cut], neg[:cut]]), np.concatenate([pos[cut:], neg[cut:]])


def k_sparse_accuracy(codes: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, k: int) -> float:
    """SAEBench's k-sparse probe: top-k latents by |mean difference| on train, logistic regression on them."""
    a, b = codes[train][y[train] == 1].mean(0), codes[train][y[train] == 0].mean(0)
    pick = np.argsort(-np.abs(a - b), kind="stable")[:k]
    x_tr, x_te = codes[train][:, pick], codes[test][:, pick]
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8          # the codes' scales differ by encoder
    clf = LogisticRegression(max_iter=2000).fit((x_tr - mu) / sd, y[train])
    return float(clf.score((x_te - mu) / sd, y[test]))


def encoders(models: Path, x_fit: torch.Tensor, steps: int) -> dict[str, tuple]:
    """Name -> (encoder, dictionary, whether it reads raw activations): the encoders compared on the TopK SAE's dictionary, and the binary SAEs."""
    topk = sc.load_encoder(models / "topk-encoder.safetensors")
    D = topk.dictionary
    out = {"topk (SAE encoder)": (topk, D, False), "omp (k=32)": (sc.get_encoder("omp", k=32).fit(D), D, False)}
    out["fista (L0 = 32)"] = (sc.calibrate("fista", D, x_fit[:256], 32.0)[0], D, False)
    out["binary-topk on the TopK dictionary"] = (
        sc.get_encoder("binary-topk", k=32, steps=steps, batch_size=512).fit(D, x_fit), D, False)
    results = json.loads((RESULTS / "binary_sae" / "results.json").read_text())["rows"]
    binaries = [r for r in results if r["model"].startswith("binary SAE") and r.get("seed", 0) == 0]
    # the variant with the fewest dead latents among those reconstructing at least as well as the default
    best = min((i for i, r in enumerate(binaries) if r["fvu"] <= binaries[0]["fvu"]), key=lambda i: binaries[i]["dead"])
    for i, label in ((0, "binary SAE (default)"), (best, "binary SAE (fewest dead)")):
        enc = sc.load_encoder(models / f"binary-{i}.safetensors")
        raw = "raw activations" in binaries[i]["model"]          # trained on activations before normalisation
        out[f"{label}: {binaries[i]['model'].split(': ', 1)[1][:32]}" if i else label] = (enc, enc.dictionary, raw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/llm-cache"))
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--n-atoms", type=int, default=1152)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--steps", type=int, default=100, help="training steps of binary-topk on the TopK dictionary")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks, out = KS, RESULTS
    if args.quick:
        args.per_class, args.steps, ks, out = 200, 50, KS[:4], Path("runs/probing-quick")
    out.mkdir(parents=True, exist_ok=True)
    t0, load = time.perf_counter(), os.getloadavg()[0]
    store = act.ActivationStore(args.cache / f"resid-{args.tokens}")
    tokens = load_file(str(args.cache / f"tokens-{args.tokens}.safetensors"))
    topic_names = json.loads((args.cache / "topics.json").read_text())
    texts = token_texts(tokens["ids"])
    tasks = labels(texts, tokens["topic"], topic_names)
    splits = {(task, s): balanced(y, args.per_class, s) for task, y in tasks.items() for s in range(SPLITS)}
    used = np.unique(np.concatenate([np.concatenate(p) for p in splits.values()]))
    x_all = store.load(normalize=True).x
    x = x_all[torch.as_tensor(used)]
    where = {int(t): i for i, t in enumerate(used)}
    n_test = min(4096, store.n_tokens // 5)
    models = args.cache / f"models-{args.tokens}-{args.n_atoms}"
    compared = encoders(models, x_all[: store.n_tokens - n_test], args.steps)
    codes = {"raw activations (576 neurons)": x.numpy()}
    for name, (enc, _, raw) in compared.items():
        codes[name] = enc.encode(x / store.scale if raw else x).detach().numpy()
        print(f"encoded with {name}: mean L0 {(codes[name] != 0).sum(1).mean():.1f}", flush=True)

    rows = []
    for name, z in codes.items():
        for task, y in tasks.items():
            y_used = y[used]                      # row i of z is token used[i]
            for k in ks:
                accs = []
                for s in range(SPLITS):
                    tr, te = (np.array([where[int(i)] for i in part]) for part in splits[task, s])
                    accs.append(k_sparse_accuracy(z, y_used, tr, te, k))
                rows.append({"encoder": name, "task": task, "k": k, "accuracy": float(np.mean(accs)),
                             "std": float(np.std(accs)), "n_test": int(len(splits[task, 0][1]))})
        print(name, " ".join(f"{r['task']}@{r['k']}={r['accuracy']:.2f}" for r in rows if r["encoder"] == name
                             and r["k"] == ks[-1]), flush=True)
    elapsed = time.perf_counter() - t0

    mean_over_tasks = {(e, k): (np.mean([r["accuracy"] for r in rows if r["encoder"] == e and r["k"] == k]),
                                np.mean([r["std"] for r in rows if r["encoder"] == e and r["k"] == k]))
                       for e in codes for k in ks}
    lines = ["| codes | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for e in codes:
        lines.append(f"| {e} | " + " | ".join(f"{mean_over_tasks[e, k][0]:.3f} ± {mean_over_tasks[e, k][1]:.3f}"
                                              for k in ks) + " |")
    lines += ["", "Per task at k = " + str(ks[-1]) + ":", "",
              "| codes | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for e in codes:
        lines.append(f"| {e} | " + " | ".join(f"{r['accuracy']:.3f}" for r in rows
                                              if r["encoder"] == e and r["k"] == ks[-1]) + " |")
    table = "\n".join(lines)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for e in codes:
        m, s = zip(*(mean_over_tasks[e, k] for k in ks))
        axes[0].errorbar(ks, m, yerr=s, marker="o", capsize=3, label=e)
    axes[0].set_xscale("log")
    axes[0].set_xticks(ks, [str(k) for k in ks])
    axes[0].set_xlabel("k (latents the probe may use)")
    axes[0].set_ylabel(f"accuracy, mean over {len(tasks)} tasks")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    width = 0.8 / len(codes)
    for j, e in enumerate(codes):
        acc = [r["accuracy"] for r in rows if r["encoder"] == e and r["k"] == ks[-1]]
        axes[1].bar(np.arange(len(tasks)) + j * width, acc, width, label=e)
    axes[1].set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, list(tasks), rotation=20, ha="right", fontsize=8)
    axes[1].set_ylim(0.4, 1.0)
    axes[1].set_ylabel(f"accuracy at k = {ks[-1]}")
    axes[1].grid(axis="y", alpha=0.3)
    fig.suptitle(f"k-sparse probing of SmolLM2-135M layer 15 codes ({args.n_atoms} latents), mean ± std over {SPLITS} splits")
    fig.tight_layout()
    fig.savefig(out / "probing.png", dpi=120)
    protocol = {"tasks": {t: int((y == 1).sum()) for t, y in tasks.items()}, "per_class": args.per_class, "ks": ks,
                "splits": SPLITS, "n_atoms": args.n_atoms, "seconds": round(elapsed), "load_average_at_start": load,
                "cpus": os.cpu_count()}
    (out / "probing.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    (out / "probing.md").write_text(table + "\n")
    print(table)
    print(f"{elapsed:.0f}s (load average {load:.1f} on {os.cpu_count()} cores at the start); results in {out}")


if __name__ == "__main__":
    main()
