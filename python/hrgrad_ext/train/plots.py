"""PNG plots of a run (matplotlib, Agg backend): solution profiles against the reference per
eps, per-task loss curves, relative errors over training, and the task-cosine matrix at a few
points of training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_compare", "plot_cosines", "plot_errors", "plot_losses", "plot_profiles", "write_plots"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profiles(model, form, eps_values, path: Path) -> None:
    """Predicted vs reference macroscopic quantities at the final time, one column per eps."""
    from .evaluation import predict, reference_profiles

    plt = _plt()
    qs = form.quantities
    fig, axes = plt.subplots(len(qs), len(eps_values), figsize=(3.2 * len(eps_values), 2.6 * len(qs)), squeeze=False)
    for j, eps in enumerate(eps_values):
        x, ref = reference_profiles(form, eps)
        pred = predict(model, form, x, eps)
        for i, q in enumerate(qs):
            ax = axes[i, j]
            ax.plot(x, ref[q], "k-", lw=1.5, label="reference")
            ax.plot(x, pred[q], "r--", lw=1.2, label="APNN")
            err = np.sqrt(np.sum((ref[q] - pred[q]) ** 2) / np.sum(ref[q] ** 2))
            ax.set_title(f"eps={eps:g} t={form.t_final_for(eps):g}  {q}  relL2 {err:.1e}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{form.name}: profiles at the end of each task's time window", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(plt, fig, ax, ylabel: str, path: Path) -> None:
    """Labels a curve-over-steps plot, writes it and frees the figure."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(records: list[dict], names: list[str], path: Path) -> None:
    """Per-task loss curves (log scale)."""
    plt = _plt()
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return
    steps = [r["step"] for r in train]
    L = np.array([r["loss"] for r in train])
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, name in enumerate(names):
        ax.semilogy(steps, L[:, k], label=name, lw=1)
    _finish(plt, fig, ax, "task loss", path)


def plot_errors(records: list[dict], path: Path) -> None:
    """Relative L2 error of every quantity and eps over training."""
    plt = _plt()
    ev = [r for r in records if r.get("kind") == "eval"]
    if not ev:
        return
    steps = [r["step"] for r in ev]
    fig, ax = plt.subplots(figsize=(6, 4))
    for eps in ev[-1]["rel_l2"]:
        for q in ev[-1]["rel_l2"][eps]:
            ax.semilogy(steps, [r["rel_l2"][eps][q] for r in ev], marker="o", ms=3, lw=1, label=f"eps={eps} {q}")
    _finish(plt, fig, ax, "relative L2 error", path)


def plot_cosines(records: list[dict], names: list[str], path: Path, snapshots: int = 4) -> None:
    """Task-gradient cosine matrices at ``snapshots`` points spread over training."""
    plt = _plt()
    train = [r for r in records if r.get("kind") == "train" and "cosines" in r]
    if not train:
        return
    idx = sorted(set(np.linspace(0, len(train) - 1, min(snapshots, len(train))).round().astype(int).tolist()))
    fig, axes = plt.subplots(1, len(idx), figsize=(3.4 * len(idx), 3.3), squeeze=False)
    im = None
    for ax, i in zip(axes[0], idx):
        C = np.array(train[i]["cosines"])
        im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"step {train[i]['step']}", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_yticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=5)
        ax.set_yticklabels(names, fontsize=5)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cos(g_i, g_j)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(trainer) -> list[Path]:
    """All plots of a finished run into its output directory; returns the paths."""
    from .trainer import read_metrics

    out = trainer.out
    records = read_metrics(out)
    names = trainer.layout.names
    paths = [out / "profiles.png", out / "losses.png", out / "errors.png", out / "cosines.png"]
    with trainer.averaged_weights() as model:
        plot_profiles(model, trainer.form, trainer.cfg.eps, paths[0])
    plot_losses(records, names, paths[1])
    plot_errors(records, paths[2])
    plot_cosines(records, names, paths[3])
    return [p for p in paths if p.is_file()]


def plot_compare(results: dict, path: Path) -> None:
    """The figure of a study (``hrgrad-ext compare``): one panel per quantity, the relative L2
    error per eps, one marker per method at the median over the seeds that finished, the bars
    spanning their range. ``results``: method -> list of
    :class:`~hrgrad_ext.train.compare.RunResult`."""
    plt = _plt()
    done = {m: [r.summary for r in rs if r.summary is not None] for m, rs in results.items()}
    done = {m: s for m, s in done.items() if s}
    if not done:
        return
    first = next(iter(done.values()))[0]
    eps_keys = list(first["rel_l2"])
    quantities = list(next(iter(first["rel_l2"].values())))
    markers = "osD^vP*Xh<>p"
    fig, axes = plt.subplots(1, len(quantities), figsize=(5.2 * len(quantities) + 1.5, 4.0), squeeze=False)
    width = 0.7 / max(1, len(done))
    for ax, q in zip(axes[0], quantities):
        for i, (method, summaries) in enumerate(done.items()):
            xs, mid, lo, hi = [], [], [], []
            for j, e in enumerate(eps_keys):
                v = [s["rel_l2"][e][q] for s in summaries if np.isfinite(s["rel_l2"][e][q])]
                if not v:
                    continue
                xs.append(j - 0.35 + width * (i + 0.5))
                mid.append(float(np.median(v)))
                lo.append(mid[-1] - min(v))
                hi.append(max(v) - mid[-1])
            ax.errorbar(xs, mid, yerr=[lo, hi], fmt=markers[i % len(markers)], ms=5, capsize=2, lw=1,
                        label=f"{method} ({len(summaries)}/{len(results[method])})")
        ax.set_yscale("log")
        ax.set_xticks(range(len(eps_keys)))
        ax.set_xticklabels([f"eps={e}" for e in eps_keys], fontsize=8)
        ax.set_ylabel(f"relative L2 error of {q}")
        ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method (runs finished)",
                       title_fontsize=7)
    seeds = sorted({s.get("seed", 0) for v in done.values() for s in v})
    fig.suptitle(f"{first['problem']}: {first['iters']} steps, seeds {', '.join(map(str, seeds))} "
                 "(marker: median, bar: min to max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
