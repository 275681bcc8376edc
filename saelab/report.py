"""Experiment reports: one folder with ``report.html`` (tables, the plot, example texts), ``report.png`` (the
plot) and ``results.json`` (every number), written atomically. The plot needs matplotlib (``pip install
saelab[plot]``); without it the HTML and JSON are still written and the HTML says the plot is missing."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import NamedTuple, Sequence

from saelab.atomic import write_bytes, write_json


class Table(NamedTuple):
    caption: str
    headers: list[str]
    rows: list[list]


class Series(NamedTuple):
    label: str
    xs: list[float]
    ys: list[float]
    axis: str = "left"
    """``left`` or ``right`` (a second y axis)."""
    style: str = "line"
    """``line`` (points joined), ``points`` (markers only) or ``curve`` (a line without markers: a fit)."""


def plot_png(series: Sequence[Series], xlabel: str, ylabel: str, y2label: str = "", title: str = "",
             log: bool = False) -> bytes | None:
    """A line plot as PNG bytes (``log``: both axes logarithmic), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(plt, series, xlabel, ylabel, y2label, title, log)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def figure(plt, series: Sequence[Series], xlabel: str, ylabel: str, y2label: str = "", title: str = "",
           log: bool = False):
    """The matplotlib figure of :func:`plot_png`. An axis whose values are all shares (in [0, 1]) spans 0-1, never
    below 0; the legend sits below the plot, where it covers no line."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax2 = ax.twinx() if any(s.axis == "right" for s in series) else None
    for i, s in enumerate(series):
        target = ax2 if s.axis == "right" else ax
        line = "none" if s.style == "points" else "--" if s.axis == "right" else "-"
        target.plot(s.xs, s.ys, marker=None if s.style == "curve" else "o", linestyle=line, color=f"C{i}",
                    label=s.label, clip_on=False)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    for axis, side in ((ax, "left"), (ax2, "right")):
        ys = [y for s in series if s.axis == side for y in s.ys if y == y]   # y == y: not NaN
        if axis is not None and not log and ys and 0 <= min(ys) and max(ys) <= 1:
            axis.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax2 is not None:
        ax2.set_ylabel(y2label)
    handles = [h for a in (ax, ax2) if a is not None for h in a.get_legend_handles_labels()[0]]
    rows = -(-len(handles) // 3)
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=min(3, len(handles)),
                   fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    return fig


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape("" if v is None else str(v))


def table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<table><caption>{html.escape(t.caption)}</caption><tr>{head}</tr>{body}</table>"


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
         "vertical-align:top}caption{text-align:left;font-weight:bold;padding:4px 0}pre{white-space:pre-wrap;"
         "background:#f6f6f6;padding:6px}code{background:#f6f6f6}")


def write_report(out: Path | str, title: str, summary: Sequence[str], tables: Sequence[Table], png: bytes | None,
                 results: dict, command: str, examples: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``report.html``, ``report.png`` and ``results.json`` into ``out``; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if png is not None:
        write_bytes(out / "report.png", png)
    figure = '<p><img src="report.png" alt="plot" style="max-width:100%"></p>' if png else \
        "<p><em>No plot: matplotlib is not installed (pip install 'saelab[plot]').</em></p>"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "".join(f"<p>{html.escape(s)}</p>" for s in summary), figure,
             "".join(table_html(t) for t in tables)]
    if examples:
        parts.append("<h2>Examples</h2>" + "".join(f"<h3>{html.escape(h)}</h3><pre>{html.escape(x)}</pre>"
                                                   for h, x in examples))
    parts.append(f"<h2>Reproduce</h2><pre>{html.escape(command)}</pre><p>All numbers: "
                 f"<a href='results.json'>results.json</a>.</p></body></html>")
    write_json(out / "results.json", results)
    write_bytes(out / "report.html", "".join(parts).encode())
    return out / "report.html"
