"""The fit's four plots (PNG): loss vs tokens per size, IsoFLOP curves with their minima, the fitted
surface against the measured runs, and predicted vs measured loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def draw_plots(rows: list[dict], result: dict, law, out_dir: Path) -> list[Path]:
    """The four PNGs into out_dir; `law` is the fitted Law (its `loss(n, d)` draws the curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    n_key = f"params_{result['params']}"
    held = {p["run"] for p in result["heldout"]}
    paths = []
    for name, draw in (
        ("loss_vs_tokens", _loss_vs_tokens), ("isoflop", _isoflop), ("surface", _surface),
        ("predicted_vs_measured", _predicted_vs_measured),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        draw(ax, rows, result, law, n_key, held)
        for axis in (ax.xaxis, ax.yaxis):  # log axes: label the decades only, not every minor tick
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        fig.tight_layout()
        path = Path(out_dir) / f"scaling_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _colors(count: int):
    import matplotlib.pyplot as plt

    return plt.cm.viridis(np.linspace(0.0, 0.9, max(count, 1)))


def _loss_vs_tokens(ax, rows, result, law, n_key, held) -> None:
    sizes = sorted({r[n_key] for r in rows})
    d_line = np.geomspace(min(r["tokens"] for r in rows), max(r["tokens"] for r in rows), 50)
    for n, color in zip(sizes, _colors(len(sizes)), strict=True):
        line = sorted((r for r in rows if r[n_key] == n), key=lambda r: r["tokens"])
        ax.plot(
            [r["tokens"] for r in line], [r["val_loss"] for r in line], "o-", color=color, label=f"N = {n:,}"
        )
        out = [r for r in line if r["run"] in held]
        ax.scatter([r["tokens"] for r in out], [r["val_loss"] for r in out], s=90, facecolors="none",
                   edgecolors="red", zorder=3)  # fmt: skip
        ax.plot(d_line, law.loss(n, d_line), "--", color=color, alpha=0.7)
    ax.set(xscale="log", xlabel="tokens D", ylabel="validation loss (nats/token)",
           title="loss vs tokens per model size (dashed: fit; red rings: held out)")  # fmt: skip
    ax.legend(fontsize=7)


def _isoflop(ax, rows, result, law, n_key, held) -> None:
    curves = result["isoflop"]
    for curve, color in zip(curves, _colors(len(curves)), strict=True):
        ns = [p["n"] for p in curve["points"]]
        ax.plot(
            ns, [p["loss"] for p in curve["points"]], "o-", color=color, label=f"C = {curve['flops']:.2g}"
        )
        ax.scatter([curve["measured_min_n"]], [curve["measured_min_loss"]], marker="*", s=180, color=color,
                   edgecolors="black", zorder=3)  # fmt: skip
        n_line = np.geomspace(min(ns), max(ns), 50)
        ax.plot(n_line, law.loss(n_line, curve["flops"] / (6 * n_line)), "--", color=color, alpha=0.6)
        ax.axvline(curve["law_n_opt"], color=color, lw=0.8, ls=":")
    ax.set(xscale="log", xlabel=f"parameters N ({result['params']})", ylabel="validation loss",
           title="IsoFLOP curves, C = 6ND (stars: measured minima; dotted: fit's N_opt)")  # fmt: skip
    ax.legend(fontsize=7)


def _surface(ax, rows, result, law, n_key, held) -> None:
    ns, ds = np.array([r[n_key] for r in rows], float), np.array([r["tokens"] for r in rows], float)
    n_grid, d_grid = np.meshgrid(np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 80),
                                 np.geomspace(ds.min() / 1.5, ds.max() * 1.5, 80))  # fmt: skip
    levels = np.linspace(min(r["val_loss"] for r in rows), max(r["val_loss"] for r in rows), 12)
    contour = ax.contour(n_grid, d_grid, law.loss(n_grid, d_grid), levels=levels, cmap="viridis")
    ax.clabel(contour, fontsize=6, fmt="%.2f")
    ax.scatter(ns, ds, c=[r["val_loss"] for r in rows], cmap="viridis", vmin=levels[0], vmax=levels[-1],
               s=70, edgecolors=["red" if r["run"] in held else "black" for r in rows])  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel=f"parameters N ({result['params']})", ylabel="tokens D",
           title="fitted L(N, D) (contours) vs measured runs (dots, same colours)")  # fmt: skip


def _predicted_vs_measured(ax, rows, result, law, n_key, held) -> None:
    measured = np.array([r["val_loss"] for r in rows])
    predicted = law.loss(
        np.array([r[n_key] for r in rows], float), np.array([r["tokens"] for r in rows], float)
    )
    mask = np.array([r["run"] in held for r in rows])
    ax.scatter(measured[~mask], predicted[~mask], label="fitted runs", color="tab:blue")
    ax.scatter(measured[mask], predicted[mask], label="held out (largest N, largest D)", color="tab:red")
    lo, hi = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.fill_between([lo, hi], [lo - 0.05, hi - 0.05], [lo + 0.05, hi + 0.05], color="gray", alpha=0.2,
                    label="within 0.05 nats")  # fmt: skip
    ax.set(xlabel="measured validation loss", ylabel="predicted by the fit",
           title="predicted vs measured")  # fmt: skip
    ax.legend(fontsize=7)
