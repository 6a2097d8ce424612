"""The comparison's plots: accuracy against n, and accuracy against the time to produce a query's model; drawn
from the summary rows, or redrawn from the tables a run wrote."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from PoE.core.checkpoint import atomic_write
from PoE.experiments.comparison import METHOD_ORDER


def plot_results(summary: list[dict], out_dir: Path, title: str, paired: list[dict] | None = None) -> list[Path]:
    """accuracy_vs_n.png and accuracy_vs_time.png (time per query on a log axis). ``paired``
    (``same_combination_rows``): PoE is also drawn on the baselines' sampled combinations, dashed, since the
    baselines' points are those combinations and PoE's solid line is the mean over all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    title = "\n".join(textwrap.wrap(title, 90))  # a long task list would run off the figure
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in summary)]
    paths = [out_dir / "accuracy_vs_n.png", out_dir / "accuracy_vs_time.png"]
    save_figure(accuracy_vs_n(summary, methods, title, paired), paths[0])
    save_figure(accuracy_vs_time(summary, methods, title), paths[1])
    return paths


def accuracy_vs_n(summary: list[dict], methods: list[str], title: str, paired: list[dict] | None) -> Any:
    """Each method's mean accuracy per n with its std as error bars; PoE on the baselines' combinations, dashed."""
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in summary})
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for i, m in enumerate(methods):
        rs = [r for r in summary if r["method"] == m]
        shift = (i - (len(methods) - 1) / 2) * 0.04  # side by side, so error bars do not hide each other
        ax.errorbar(
            [r["n"] + shift for r in rs],
            [r["acc_mean"] for r in rs],
            yerr=[r["acc_std"] for r in rs],
            marker="o",
            capsize=3,
            label=m,
        )
    sampled = [r for r in paired or [] if "poe" in r]
    if sampled:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = cycle[methods.index("poe") % len(cycle)] if "poe" in methods else None
        ax.plot(
            [r["n"] for r in sampled],
            [r["poe"] for r in sampled],
            linestyle="--",
            marker="x",
            color=color,
            label="poe, the baselines' combinations",
        )
    ax.set_xticks(ns)  # n is a count of tasks: whole numbers only
    ax.set_xlabel("primitive tasks in the query (n)")
    ax.set_ylabel("accuracy on the composite task (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides nothing
    return fig


def accuracy_vs_time(summary: list[dict], methods: list[str], title: str) -> Any:
    """Mean accuracy against time per query (log axis): a colour per method, a marker shape per n."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ns = sorted({r["n"] for r in summary})
    markers = dict(zip(ns, "osD^vP*X", strict=False))  # one marker shape per n, no labels
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    timed = {m for m in methods if any(r["method"] == m and r["seconds_per_query"] > 0 for r in summary)}
    for i, m in enumerate(methods):
        for r in (r for r in summary if r["method"] == m and r["seconds_per_query"] > 0):
            ax.scatter(
                r["seconds_per_query"], r["acc_mean"], color=colors[i % len(colors)], marker=markers[r["n"]], s=36
            )
    # the legend names what is drawn: the Oracle is not built per query (time 0), which a log axis cannot show
    handles = [
        Line2D([], [], color=colors[i % len(colors)], marker="o", linestyle="", label=m)
        for i, m in enumerate(methods)
        if m in timed
    ]
    untimed = [m for m in methods if m not in timed]
    if untimed:
        ax.text(
            0.0,
            -0.2,
            f"not drawn (no model built per query, time 0): {', '.join(untimed)}",
            transform=ax.transAxes,
            fontsize=7,
            color="gray",
            va="top",
        )
    handles += [Line2D([], [], color="gray", marker=markers[n], linestyle="", label=f"n = {n}") for n in ns]
    ax.set_xscale("log")
    ax.set_xlabel("time to produce the model for a query (s, log scale)")
    ax.set_ylabel("accuracy on the composite task (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def replot(out_dir: Path, title: str) -> list[Path]:
    """Redraw the plots from the tables ``Run_Experiments.py`` wrote into ``out_dir`` (composite_tasks.csv and
    same_combinations.csv), without scoring or training anything."""

    def rows(name: str) -> list[dict[str, Any]]:
        path = out_dir / name
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [
                {k: v if k in ("method", "tasks") else int(v) if k == "n" else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)
            ]

    return plot_results(rows("composite_tasks.csv"), out_dir, title, rows("same_combinations.csv"))


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
