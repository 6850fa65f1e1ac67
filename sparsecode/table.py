"""Text tables of result rows that fit a width: the columns that matter most first, the rest named."""
from __future__ import annotations

import math
from typing import Callable, Sequence

#: Columns in the order they are kept when a table must be narrowed; columns not listed come after,
#: in their own order. The encoder name always stays.
PRIORITY = ("encoder", "fvu", "l0", "code_mcc", "f1", "signals_per_s", "k", "lam", "ce_increase", "ce_recovered",
            "objective_gap", "exact_support", "dictionary_mcc", "nmse_db", "dead", "dense_10", "dense_50",
            "ratio", "ratio_to_floor", "flops_per_signal", "uncertified", "fit_s")
#: Each column's share of a box-drawn table's width beyond its text: padding on both sides and a rule.
CELL_EXTRA = 3


def format_value(value) -> str:
    """Four significant digits; thousands separated; tiny values in scientific notation; '-' for none."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 1000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def fit_columns(rows: Sequence[dict], columns: Sequence[str], width: int | None,
                label: Callable[[str], str] = str, extra: int = CELL_EXTRA) -> tuple[list[str], list[str]]:
    """The columns (in their given order) that fit in `width` characters, chosen by `PRIORITY`, and
    the ones left out. Each column needs its widest cell or label plus `extra`; ``width=None`` keeps all."""
    columns = list(columns)
    if width is None:
        return columns, []
    need = {c: max([len(label(c))] + [len(format_value(r.get(c))) for r in rows]) + extra for c in columns}
    rank = {c: i for i, c in enumerate(PRIORITY)}
    order = sorted(columns, key=lambda c: (rank.get(c, len(PRIORITY)), columns.index(c)))
    kept, used = set(), 1                       # the table's closing rule
    for c in order:
        if c == "encoder" or used + need[c] <= width:
            kept.add(c)
            used += need[c]
    return [c for c in columns if c in kept], [c for c in columns if c not in kept]


def text_table(rows: Sequence[dict], columns: Sequence[str], title: str = "", width: int | None = None) -> str:
    """A plain-text table (no box drawing): a title line, the header, one line per row, and a line
    naming the columns that did not fit `width`."""
    shown, left_out = fit_columns(rows, columns, width, extra=2)
    cells = [[format_value(r.get(c)) for c in shown] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(shown)]
    left = {"encoder", "reference", "variant", "skipped"}

    def line(values):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(shown, values, widths)).rstrip()

    out = ([title] if title else []) + [line(shown)] + [line(values) for values in cells]
    if left_out:
        out.append(f"(not shown to fit {width} columns: {', '.join(left_out)})")
    return "\n".join(out)
