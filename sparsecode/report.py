"""Figures and a Markdown summary from a recovery results file (`sparsecode report RESULTS`)."""
from __future__ import annotations

import base64
import html
import logging
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
# Figure objects draw with the Agg canvas whatever backend the user's session has chosen, so the
# library never switches (or imports) pyplot.
from matplotlib.figure import Figure

from . import _io
from .recovery import read_results

log = logging.getLogger(__name__)

#: ranking columns: (key, label, higher is better)
RANKED = (("code_mcc", "code MCC", True), ("f1", "support F1", True), ("exact_support", "exact support", True),
          ("fvu", "FVU", False), ("l0", "L0", None), ("flops_per_signal", "FLOPs/signal", None),
          ("signals_per_s", "signals/s", None))


def flat_rows(records: list[dict]) -> list[dict]:
    """One flat row per (cell, encoder) that ran: the cell's settings plus the encoder's metrics."""
    out = []
    for rec in records:
        for row in rec.get("rows", []):
            if "skipped" not in row:
                out.append({**rec["cell"], **row})
    return out


def _having(rows: list[dict], *keys: str) -> list[dict]:
    """The rows that hold every one of `keys` (a file may mix presets whose cells have other axes)."""
    return [r for r in rows if all(r.get(key) is not None for key in keys)]


def colors(encoders) -> dict:
    """One colour per encoder, the same in every figure."""
    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(sorted(encoders))}


def _marker(palette: dict, name: str) -> dict:
    """Marker and dash per encoder, so that encoders with identical results stay visible."""
    i = sorted(palette).index(name)
    return {"marker": "osD^v<>ph*"[i % 10], "linestyle": ("-", "--", ":", "-.")[i % 4], "color": palette[name]}


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def ranking(rows: list[dict]) -> list[dict]:
    """Per encoder: the mean of each ranked metric over every cell and seed, best code MCC first."""
    by = defaultdict(list)
    for r in rows:
        by[r["encoder"]].append(r)
    table = []
    for name, mine in by.items():
        entry = {"encoder": name, "cells": len(mine)}
        for key, _, _ in RANKED:
            entry[key] = _mean([r.get(key) for r in mine])
        table.append(entry)
    table.sort(key=lambda e: -e["code_mcc"] if np.isfinite(e["code_mcc"]) else 0)
    return table


def _fmt(value) -> str:
    if not np.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}"


def markdown_ranking(table: list[dict]) -> str:
    head = "| rank | encoder | cells | " + " | ".join(label for _, label, _ in RANKED) + " |"
    lines = [head, "|---:|---|---:|" + "---:|" * len(RANKED)]
    for i, e in enumerate(table, 1):
        lines.append(f"| {i} | `{e['encoder']}` | {e['cells']} | " + " | ".join(_fmt(e[k]) for k, _, _ in RANKED) + " |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    _io.write_figure(fig, path, dpi=120)
    return path


def phase_transition(rows, palette, out: Path, prefix: str = "") -> Path | None:
    """Exact-support success rate over (M/N, K/M), one panel per encoder (Donoho-Tanner picture)."""
    rows = _having(rows, "n_atoms", "d", "k", "exact_support")
    if len({(r["n_atoms"], r["d"], r["k"]) for r in rows}) < 2:
        return None
    names = sorted({r["encoder"] for r in rows})
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        points = defaultdict(list)
        for r in rows:
            if r["encoder"] == name:
                points[(r["d"] / r["n_atoms"], r["k"] / r["d"])].append(r["exact_support"])
        delta, rho = zip(*points)
        rate = [np.mean(v) for v in points.values()]
        sc = ax.scatter(delta, rho, c=rate, cmap="viridis", vmin=0, vmax=1, s=180, marker="s", edgecolors="k")
        ax.set_xlabel("undersampling δ = M / N")
        ax.set_ylabel("sparsity ρ = K / M")
        ax.set_title(name, color=palette[name])
        ax.set_xscale("log", base=2)
    fig.colorbar(sc, ax=axes.ravel().tolist(), label="exact support recovery rate")
    fig.suptitle("Phase transition: fraction of signals whose support is recovered exactly")
    path = out / f"{prefix}phase_transition.png"
    _io.write_figure(fig, path, dpi=120, bbox_inches="tight")
    return path


def mcc_vs_n(rows, palette, out: Path, prefix: str = "") -> Path | None:
    """Code MCC against the number of atoms N, one line per encoder, one panel per (M, K)."""
    rows = _having(rows, "n_atoms", "d", "k")
    if len({r["n_atoms"] for r in rows}) < 2:
        return None
    panels = sorted({(r["d"], r["k"]) for r in rows})
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (d, k) in zip(axes[0], panels):
        for name in sorted({r["encoder"] for r in rows}):
            by_n = defaultdict(list)
            for r in rows:
                if r["encoder"] == name and r["d"] == d and r["k"] == k and r.get("code_mcc") is not None:
                    by_n[r["n_atoms"]].append(r["code_mcc"])
            if not by_n:
                continue
            ns = sorted(by_n)
            ax.errorbar(ns, [np.mean(by_n[n]) for n in ns], yerr=[np.std(by_n[n]) for n in ns], label=name,
                        capsize=3, **_marker(palette, name))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("atoms N (count)")
        ax.set_ylabel("code MCC (0 to 1)")
        ax.set_title(f"M = {d}, K = {k}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="encoder", fontsize=8)
    return _save(fig, out / f"{prefix}mcc_vs_n.png")


def pareto(rows, palette, out: Path, prefix: str = "") -> Path:
    """FVU vs L0, code MCC vs FLOPs per signal, code MCC vs wall time: every cell, every encoder."""
    specs = [("l0", "fvu", "mean L0 (active atoms per signal)", "FVU (fraction of variance unexplained)", False, True),
             ("flops_per_signal", "code_mcc", "FLOPs per signal", "code MCC (0 to 1)", True, False),
             ("encode_s", "code_mcc", "encode wall time (s)", "code MCC (0 to 1)", True, False)]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, (xk, yk, xl, yl, logx, logy) in zip(axes, specs):
        for name in sorted({r["encoder"] for r in rows}):
            pts = [(r.get(xk), r.get(yk)) for r in rows if r["encoder"] == name]
            pts = [(a, b) for a, b in pts if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)
                   and (not logx or a > 0) and (not logy or b > 0)]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, color=palette[name], label=name, alpha=0.75, s=22)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(title="encoder", fontsize=7)
    fig.suptitle("Trade-offs: each point is one cell (grid point and seed)")
    return _save(fig, out / f"{prefix}pareto.png")


def snr_curves(rows, palette, out: Path, prefix: str = "") -> Path | None:
    """NMSE (dB) of the codes against SNR, one line per encoder (compressed-sensing preset)."""
    rows = _having(rows, "snr_db")
    if len({r["snr_db"] for r in rows}) < 2:
        return None
    fig = Figure(figsize=(5, 3.8))
    ax = fig.subplots()
    for name in sorted({r["encoder"] for r in rows}):
        by = defaultdict(list)
        for r in rows:
            if r["encoder"] == name and r.get("nmse_db") is not None:
                by[r["snr_db"]].append(r["nmse_db"])
        if by:
            xs = sorted(by)
            ax.plot(xs, [np.mean(by[s]) for s in xs], label=name, **_marker(palette, name))
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("code NMSE (dB)")
    ax.set_title("Code error against noise")
    ax.grid(alpha=0.3)
    ax.legend(title="encoder", fontsize=8)
    return _save(fig, out / f"{prefix}nmse_vs_snr.png")


def report(results, out) -> Path:
    """Render every figure that the results support, a Markdown summary (`report.md`, figures beside
    it) and a self-contained HTML page (`report.html`: the same text and ranking tables, figures
    embedded as base64 PNG, so the one file can be mailed or opened anywhere); returns the summary
    path. The results file is only read. A file holding sweeps of several presets gets one section
    (and one set of figures, named by preset) per preset."""
    results, out = Path(results), Path(out)
    records = read_results(results)
    if not records:
        raise ValueError(f"{results} holds no finished cells")
    if not flat_rows(records):
        raise ValueError(f"{results}: every cell was skipped; nothing to plot")
    palette = colors({r["encoder"] for r in flat_rows(records)})
    by_preset: dict[str, list] = defaultdict(list)
    for rec in records:
        by_preset[rec.get("preset", "?")].append(rec)
    several = len(by_preset) > 1
    lines = [f"# Recovery benchmark: {', '.join(by_preset)}", ""]
    for preset, recs in by_preset.items():
        if several:
            lines += [f"## {preset}", ""]
        lines += _section(recs, results, out, palette, prefix=f"{preset}-" if several else "",
                          level="###" if several else "##")
    summary = out / "report.md"
    _io.write_text(summary, "\n".join(lines))
    _io.write_text(out / "report.html", markdown_to_html(lines, out))
    return summary


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the summary uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def markdown_to_html(lines: list[str], folder: Path) -> str:
    """The summary's lines (headings, paragraphs, pipe tables, list items, figure links) as one
    HTML page whose figures are embedded from `folder` as base64 PNG data."""
    body, table, items = [], [], []

    def flush():
        if table:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table]
            head, rows = cells[0], cells[2:]
            aligns = ["right" if a.strip().endswith(":") else "left" for a in cells[1]]
            body.append("<table>\n<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>")
            body.append("<tbody>" + "".join("<tr>" + "".join(f'<td style="text-align:{a}">{_inline(c)}</td>'
                                                             for c, a in zip(row, aligns)) + "</tr>\n"
                                            for row in rows) + "</tbody></table>")
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    title = "sparsecode report"
    for line in "\n".join(lines).splitlines():          # a table arrives as one multi-line entry
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            text = line.lstrip("#").strip()
            if level == 1:
                title = text
            body.append(f"<h{level}>{_inline(text)}</h{level}>")
        elif line.startswith("![") and line.endswith(")"):
            alt, name = line[2:-1].split("](", 1)
            data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}"
             "th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:.9em}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _section(records: list[dict], results: Path, out: Path, palette: dict, prefix: str, level: str) -> list[str]:
    rows = flat_rows(records)
    skipped = [(rec["cell"], row["encoder"], row["skipped"]) for rec in records for row in rec.get("rows", [])
               if "skipped" in row] + [(rec["cell"], "all", rec["skipped"]) for rec in records if "skipped" in rec]
    lines = [f"{len(records)} cells (grid points x seeds), {len(rows)} encoder runs, from `{results.name}`.",
             f"Matching: {records[0].get('match', '?')}; budget: {records[0].get('budget') or 'none'}.", ""]
    if rows:
        figures = [f for f in (phase_transition(rows, palette, out, prefix), mcc_vs_n(rows, palette, out, prefix),
                               snr_curves(rows, palette, out, prefix), pareto(rows, palette, out, prefix))
                   if f is not None]
        lines += [f"{level} Ranking (means over all cells)", "", markdown_ranking(ranking(rows)), ""]
        for f in figures:
            lines += [f"![{f.stem}]({f.name})", ""]
    if skipped:
        lines += [f"{level} Skipped", ""] + [f"- {enc} at {cell}: {why}" for cell, enc, why in skipped] + [""]
    return lines
