"""The sweep as a picture: cost vs bandwidth per strategy, and where each stage runs across the sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aiflow_cli.plan.problem import Problem
from aiflow_cli.plan.sweep import Sweep

TIER_COLOURS = {"device": "#4c72b0", "edge": "#dd8452", "cloud": "#55a868"}


def plot_sweep(problem: Problem, result: Sweep, path: str | Path) -> None:
    """Writes a PNG: top, objective (ms) vs the swept link's uplink (log-log) per strategy with the switch
    points of the optimum; bottom, the tier each stage runs on at every sweep point (optimal plan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    xs = np.array([p.uplink_mbps for p in result.points])
    names = [s.name for s in result.points[0].strategies]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ylabel = "bottleneck ms / request" if problem.objective == "throughput" else "predicted ms / request"
    for name in names:
        ys = []
        for p in result.points:
            s = next(x for x in p.strategies if x.name == name)
            ok = s.evaluation is not None and s.evaluation.feasible
            ys.append(s.evaluation.objective_value(problem.objective) if ok else np.nan)
        style = {"linewidth": 3, "color": "black"} if name == "aiflow plan" else {"linewidth": 1.5, "linestyle": "--"}
        ax.plot(xs, ys, label=name, marker="o", markersize=3, **style)
    for c in result.changes:
        ax.axvline(c.at_mbps, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    title = f"{problem.model}: {problem.objective}" + (f" ({problem.tokens} tokens)" if problem.tokens else "")
    ax.set_title(f"{title}, sweeping {result.link} uplink")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    # where the stages run: rows are stages, columns sweep points, colour the tier
    grid = np.full((problem.n_stages, len(xs)), np.nan)
    for j, p in enumerate(result.points):
        pl = p.optimal.placement
        if pl is None:
            continue
        for t in range(problem.n_tiers):
            grid[pl.bounds[t] : pl.bounds[t + 1], j] = t
    cmap = ListedColormap([TIER_COLOURS.get(t, "grey") for t in problem.tiers])
    edges = np.concatenate([[xs[0] / (xs[1] / xs[0]) ** 0.5], np.sqrt(xs[1:] * xs[:-1]), [xs[-1] * (xs[-1] / xs[-2]) ** 0.5]])
    ax2.pcolormesh(edges, np.arange(problem.n_stages + 1), np.ma.masked_invalid(grid), cmap=cmap,
                   vmin=-0.5, vmax=problem.n_tiers - 0.5, shading="flat")
    ax2.set_ylabel("stage (optimal plan)")
    ax2.set_xlabel(f"{result.link} uplink, Mbit/s (downlink scaled with it)")
    ax2.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=TIER_COLOURS.get(t, "grey")) for t in problem.tiers]
    ax2.legend(handles, problem.tiers, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(problem.tiers), frameon=False)
    if problem.n_stages <= 40:
        ax2.set_yticks(np.arange(problem.n_stages) + 0.5)
        ax2.set_yticklabels(problem.stage_names, fontsize=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
