"""Figures. Built on `matplotlib.figure.Figure` directly, never through pyplot, so importing this
module (or the library) leaves the user's matplotlib backend as it is."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import _io


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure      # matplotlib is needed only by those who draw
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def firing_histogram(rates, path, title: str = "") -> Path:
    """Log-scale histogram of per-latent firing rates (dead latents counted in the title)."""
    rates = np.asarray(rates, dtype=float)
    alive = rates[rates > 0]
    fig, ax = _figure((5.5, 3.6))
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color="tab:blue")
    for threshold, style in ((0.1, "--"), (0.5, ":")):
        ax.axvline(math.log10(threshold), color="tab:red", linestyle=style, label=f"firing on {threshold:.0%}")
    ax.set_xlabel("log10 firing rate (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({int((rates == 0).sum())} dead of {rates.size})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _io.write_figure(fig, path, dpi=120)


def scale_figure(rows: list[dict], path, title: str = "") -> Path:
    """Throughput against n_atoms (rows of `bench.scale`), one line per encoder and (d, k), on log axes."""
    fig, ax = _figure((7, 4.5))
    groups: dict = {}
    for row in rows:
        if "signals_per_s" in row:
            groups.setdefault((row["encoder"], row["d"], row["k"]), []).append((row["n_atoms"], row["signals_per_s"]))
    for (name, d, k), points in sorted(groups.items()):
        points.sort()
        style = "--" if name == "floor" else "-"
        label = "amortised floor (x W^T + top-k)" if name == "floor" else name
        ax.plot(*zip(*points), style, marker="o", label=f"{label}, d={d}, k={k}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("atoms in the dictionary (n_atoms)")
    ax.set_ylabel("throughput (signals/s)")
    ax.set_title(title or "Inference throughput against dictionary size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _io.write_figure(fig, path, dpi=120)
