"""Shared by the experiment scripts: seeds loop, mean ± std tables, figures."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def at_least_one(text: str) -> int:
    """argparse type of counts such as --seeds and --steps: 0 or a negative value would run nothing."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seeds_experiment(name: str, doc: str, run, keys: tuple[str, ...], labels: dict[str, str], protocol: dict,
                     figure_keys: tuple[str, ...], title: str) -> None:
    """Command line, run over seeds, mean ± std table, JSON, figure: what every paper-c script does."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=at_least_one, default=5000, help="training steps of the trained methods")
    parser.add_argument("--seeds", type=at_least_one, default=5)
    args = parser.parse_args()
    rows = run(args.steps, args.seeds)
    report_seeds(name, rows, keys, labels, {**protocol, "steps": args.steps, "seeds": args.seeds}, figure_keys,
                 f"{title}, mean ± std over {args.seeds} seeds")


def report_seeds(name: str, rows: list[dict], keys: tuple[str, ...], labels: dict[str, str], protocol: dict,
                 figure_keys: tuple[str, ...], title: str) -> dict:
    """Mean ± std table, JSON and bar figure of per-seed rows; returns the saved payload."""
    summary = summarise(rows, keys)
    table = markdown_table(summary, keys, labels)
    payload = {"protocol": protocol, "rows": rows, "summary": summary}
    path = save(name, payload, table)
    bar_figure(summary, figure_keys, labels, title, name)
    print(table)
    print(f"saved {path}")
    return payload


def summarise(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and std over seeds of each encoder's metrics, in first-seen encoder order."""
    order = list(dict.fromkeys(r["encoder"] for r in rows))
    out = []
    for name in order:
        mine = [r for r in rows if r["encoder"] == name]
        entry = {"encoder": name, "seeds": len(mine)}
        for key in keys:
            values = np.array([r[key] for r in mine if r.get(key) is not None], dtype=float)
            if values.size:
                entry[key] = float(values.mean())
                entry[key + "_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out.append(entry)
    return out


def markdown_table(summary: list[dict], keys: tuple[str, ...], labels: dict[str, str]) -> str:
    head = "| encoder | " + " | ".join(labels[k] for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    lines = [head, rule]
    for entry in summary:
        cells = []
        for key in keys:
            if key not in entry:
                cells.append("")
            elif key == "flops_per_signal":
                cells.append(f"{entry[key]:,.0f}")
            else:
                cells.append(f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}")
        lines.append(f"| `{entry['encoder']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(name: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path


def bar_figure(summary: list[dict], keys: tuple[str, ...], labels: dict[str, str], title: str, name: str) -> Path:
    names = [e["encoder"] for e in summary]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    colors = plt.get_cmap("tab10")(np.arange(len(names)) % 10)
    for ax, key in zip(axes[0], keys):
        means = [e.get(key, np.nan) for e in summary]
        stds = [e.get(key + "_std", 0.0) for e in summary]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(labels[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
