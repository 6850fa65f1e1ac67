"""The Markdown and HTML summary of a recovery results file (`sparsecode report RESULTS`); its
figures come from `plots`."""
from __future__ import annotations

import base64
import html
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import _io
from .plots import colors, mcc_vs_n, pareto, phase_transition, snr_curves
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
