"""The comparison plots, redrawn from the shipped tables (``plots.replot``): each legend names what is drawn."""

from __future__ import annotations

from PoE.experiments import plots

from .conftest import ROOT


def test_time_plot_legend_names_only_what_it_draws(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))  # nothing is written
    plots.replot(ROOT / "addImg", "cifar100")
    by_n, by_time = (fig.axes[0] for fig in figures)
    legend = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert {"oracle", "poe", "ckd"} <= set(legend(by_n))
    assert "oracle" not in legend(by_time) and {"poe", "ckd", "n = 2"} <= set(legend(by_time))  # oracle: time 0
    assert any("oracle" in t.get_text() for t in by_time.texts)  # ... and the figure says why it is missing
    drawn = sum(len(c.get_offsets()) for c in by_time.collections)
    assert drawn == 4 * 8  # n = 2..5 for poe and the seven baselines
