"""The sweep as a picture: cost vs bandwidth per strategy, and where each stage runs across the sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aiflow_cli.plan.explain import OPTIMAL
from aiflow_cli.plan.problem import Problem
from aiflow_cli.plan.sweep import Sweep

TIER_COLOURS = {"device": "#4c72b0", "edge": "#dd8452", "cloud": "#55a868"}


def strategy_series(problem: Problem, result: Sweep) -> dict[str, tuple[np.ndarray, str]]:
    """Strategy name -> (objective ms at each sweep point, nan where infeasible; its legend label). A strategy
    that equals the optimum at every point says so in its label, since its line lies under the plan's."""
    out = {}
    for name in [s.name for s in result.points[0].strategies]:
        ys = []
        for p in result.points:
            ev = next(x for x in p.strategies if x.name == name).evaluation
            ys.append(ev.objective_value(problem.objective) if ev is not None and ev.feasible else np.nan)
        out[name] = np.array(ys, dtype=float)
    plan = out.get(OPTIMAL)
    return {
        name: (
            ys,
            f"{name} (= {OPTIMAL})"
            if name != OPTIMAL and plan is not None and np.allclose(ys, plan, rtol=1e-9, equal_nan=True)
            else name,
        )
        for name, ys in out.items()
    }


def plot_sweep(problem: Problem, result: Sweep, path: str | Path) -> None:
    """Writes a PNG: top, objective (ms) vs the swept link's uplink (log-log) per strategy with the switch
    points of the optimum; bottom, the tier each stage runs on at every sweep point (optimal plan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    xs = np.array([p.uplink_mbps for p in result.points])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ylabel = "bottleneck ms / request" if problem.objective == "throughput" else "predicted ms / request"
    for name, (ys, label) in strategy_series(problem, result).items():
        # The plan is drawn first and thick, the others dashed on top, so a strategy equal to it stays visible.
        style = (
            {"linewidth": 4, "color": "black", "zorder": 2}
            if name == OPTIMAL
            else {"linewidth": 1.5, "linestyle": "--", "zorder": 3}
        )
        ax.plot(xs, ys, label=label, marker="o", markersize=3, **style)
    for i, c in enumerate(result.changes):
        for a in (ax, ax2):
            a.axvline(
                c.at_mbps,
                color="grey",
                linewidth=0.8,
                linestyle=":",
                zorder=4,
                label="optimal plan changes" if a is ax and i == 0 else None,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain numbers at 1-2-5 steps: a sweep often spans less than a decade, where 10^k ticks alone say nothing.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
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
    edges = np.concatenate(
        [[xs[0] / (xs[1] / xs[0]) ** 0.5], np.sqrt(xs[1:] * xs[:-1]), [xs[-1] * (xs[-1] / xs[-2]) ** 0.5]]
    )
    ax2.pcolormesh(
        edges,
        np.arange(problem.n_stages + 1),
        np.ma.masked_invalid(grid),
        cmap=cmap,
        vmin=-0.5,
        vmax=problem.n_tiers - 0.5,
        shading="flat",
    )
    ax2.set_ylabel("stage (optimal plan)")
    ax2.set_xlabel(f"{result.link} uplink, Mbit/s (downlink scaled with it)")
    ax2.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=TIER_COLOURS.get(t, "grey")) for t in problem.tiers]
    ax2.legend(
        handles,
        problem.tiers,
        fontsize=8,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(problem.tiers),
        frameon=False,
    )
    if problem.n_stages <= 40:
        ax2.set_yticks(np.arange(problem.n_stages) + 0.5)
        ax2.set_yticklabels(problem.stage_names, fontsize=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
