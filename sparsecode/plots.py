"""Figures. Built on `matplotlib.figure.Figure` directly, never through pyplot, so importing this
module (or the library) leaves the user's matplotlib backend as it is."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import _io


def _new_figure(**kwargs):
    # Figure objects draw with the Agg canvas whatever backend the user's session has chosen, so the
    # library never switches (or imports) pyplot; matplotlib is needed only by those who draw
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _figure(size: tuple[float, float]):
    fig = _new_figure(figsize=size)
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
    """Throughput against n_atoms (rows of `bench.scale`) on log axes: one panel per (d, k), one line per
    encoder in the same colour in every panel, the amortised floor dashed."""
    cells = sorted({(row["d"], row["k"]) for row in rows if "signals_per_s" in row})
    ds, ks = sorted({d for d, _ in cells}), sorted({k for _, k in cells})
    fig = _new_figure(figsize=(3.4 * len(ks) + 2.2, 2.9 * len(ds) + 0.6))
    axes = fig.subplots(len(ds), len(ks), squeeze=False, sharex=True)
    names = sorted({row["encoder"] for row in rows if "signals_per_s" in row} - {"floor"})
    palette = colors(names)
    for (d, k) in cells:
        ax = axes[ds.index(d)][ks.index(k)]
        lines: dict = {}
        for row in rows:
            if "signals_per_s" in row and (row["d"], row["k"]) == (d, k):
                lines.setdefault(row["encoder"], []).append((row["n_atoms"], row["signals_per_s"]))
        for name, points in sorted(lines.items()):
            points.sort()
            if name == "floor":
                ax.plot(*zip(*points), "--", color="black", marker=".", label="amortised floor (x W^T + top-k)")
            else:
                ax.plot(*zip(*points), color=palette[name], marker=_marker(palette, name)["marker"], label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"d={d}, k={k}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("atoms in the dictionary (n_atoms)")
    for row_axes in axes:
        row_axes[0].set_ylabel("throughput (signals/s)")
    handles: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "Inference throughput against dictionary size", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (3.4 * len(ks) + 2.2), 1))
    return _io.write_figure(fig, path, dpi=120)


# --- recovery sweeps (`sparsecode report`) -------------------------------------------------------
def _having(rows: list[dict], *keys: str) -> list[dict]:
    """The rows that hold every one of `keys` (a file may mix presets whose cells have other axes)."""
    return [r for r in rows if all(r.get(key) is not None for key in keys)]


def colors(encoders) -> dict:
    """One colour per encoder, the same in every figure."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(sorted(encoders))}


def _marker(palette: dict, name: str) -> dict:
    """Marker and dash per encoder, so that encoders with identical results stay visible."""
    i = sorted(palette).index(name)
    return {"marker": "osD^v<>ph*"[i % 10], "linestyle": ("-", "--", ":", "-.")[i % 4], "color": palette[name]}


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
    fig = _new_figure(figsize=(4.2 * ncols, 3.6 * nrows))
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
    fig = _new_figure(figsize=(4.2 * len(panels), 3.6))
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
    fig = _new_figure(figsize=(13, 3.8))
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
    fig = _new_figure(figsize=(5, 3.8))
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
