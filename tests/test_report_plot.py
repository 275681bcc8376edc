"""Report plots: a share axis spans 0-1 and never goes below 0; the legend sits below the plot, off the lines."""

import pytest

from saelab.report import Series, figure, plot_png

plt = pytest.importorskip("matplotlib.pyplot")


def test_a_share_axis_stays_in_0_1_and_the_legend_is_off_the_axes():
    series = [Series("on concept", [0, 1, 2, 4], [0.0, 0.0, 0.4, 0.95]),
              Series("NLL", [0, 1, 2, 4], [2.1, 2.2, 2.9, 4.0], axis="right")]
    fig = figure(plt, series, "strength", "share", "NLL")
    ax, ax2 = fig.axes
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax2.get_ylim()[0] > 1.0           # not a share: matplotlib's own limits
    assert ax.get_legend() is None and ax2.get_legend() is None and len(fig.legends) == 1
    legend_top = fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1
    assert legend_top <= ax.get_window_extent(fig.canvas.get_renderer()).y0   # below the plot area
    plt.close(fig)


def test_values_outside_0_1_and_log_plots_keep_their_own_limits():
    fig = figure(plt, [Series("fvu", [1, 2, 3], [0.5, 1.4, 2.0])], "x", "y")
    assert fig.axes[0].get_ylim()[1] > 2.0
    plt.close(fig)
    assert plot_png([Series("a", [1, 10], [0.1, 0.01])], "x", "y", log=True).startswith(b"\x89PNG")
