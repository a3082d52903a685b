"""Drawing a report's charts with Plotly: one self-contained, interactive HTML page that works offline, and PNGs.

Figures are Plotly figure dictionaries (what ``plotly.graph_objects.Figure.to_dict()`` gives), rendered in the page
by the plotly.js bundle that the ``plotly`` package ships, inlined once, so the page makes no network request. PNGs
go through Plotly's own exporter (kaleido), which drives a local Chrome or Chromium.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from plotly.colors import qualitative

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.reports.panels import Chart, Series

# Plotly's default qualitative palette: a variant keeps its colour on every chart
# D3's category10: its first five hues (blue, orange, green, red, purple) stay apart on a band-filled comparison of
# five variants, where Plotly's default puts a blue-violet next to a purple
PALETTE = tuple(qualitative.D3)
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


@dataclass
class FigureChart(Chart):
    """A chart another library has drawn (``optuna.visualization`` for ``plasticity tune``).

    Its Plotly figure dictionary goes onto the page as it is, beside the library's own charts.
    """

    plotly: dict[str, Any] = field(default_factory=dict)

    @property
    def points(self) -> int:
        return len(self.plotly.get("data") or [])


def _values(array: np.ndarray | Sequence[Any]) -> list[Any]:
    """JSON-ready values for a chart.

    JSON-ready values: NaN and ±inf become ``null`` (a gap in the line), floats keep 7 significant digits (float32's
    precision, which is what the loggers record; it keeps a 150-task comparison's page small).
    """
    values = np.asarray(array)
    if values.dtype.kind in "fc":
        return [float(f"{v:.7g}") if math.isfinite(v) else None for v in values.tolist()]
    return values.tolist()


def _band(series: Series, color: str, legend_group: str) -> dict[str, Any] | None:
    if series.low is None or series.high is None or not np.isfinite(series.low).any():
        return None
    keep = np.isfinite(series.low) & np.isfinite(series.high)
    x = series.x[keep]
    return {
        "type": "scatter",
        "x": _values(np.concatenate([x, x[::-1]])),
        "y": _values(np.concatenate([series.high[keep], series.low[keep][::-1]])),
        "fill": "toself",
        "fillcolor": color,
        "opacity": 0.18,
        "line": {"width": 0, "color": color},
        "hoverinfo": "skip",
        "showlegend": False,
        "legendgroup": legend_group,
        "name": f"{legend_group} 95% band",
        "meta": "band",
    }


def figure(chart: Chart) -> dict[str, Any]:
    """The Plotly figure dictionary of ``chart``."""
    if isinstance(chart, FigureChart):
        return chart.plotly
    layout: dict[str, Any] = {
        "title": {"text": html.escape(chart.title), "font": {"size": 14}},
        "template": "plotly_white",
        "height": 380,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "xaxis": {"title": {"text": html.escape(chart.x_label)}},
        "yaxis": {"title": {"text": html.escape(chart.y_label)}},
        "legend": {"font": {"size": 10}},
        "hovermode": "closest",
    }
    if chart.log_y:
        layout["yaxis"]["type"] = "log"
    if chart.kind == "heatmap":
        x = chart.x_ticks if chart.x_ticks is not None else list(range(chart.z.shape[1]))
        y = chart.y_ticks if chart.y_ticks is not None else list(range(chart.z.shape[0]))
        data = [
            {
                "type": "heatmap",
                "z": [_values(row) for row in chart.z],
                "x": [str(v) for v in x] if not all(isinstance(v, (int, float)) for v in x) else list(x),
                "y": [str(v) for v in y],
                "colorscale": "Viridis",
                "hoverongaps": False,
                "name": chart.title,
            }
        ]
        layout["yaxis"]["autorange"] = "reversed"
        layout["yaxis"]["type"] = "category"
        return {"data": data, "layout": layout}

    data: list[dict[str, Any]] = []
    groups = list(dict.fromkeys(s.group for s in chart.series))
    labels = list(dict.fromkeys(s.name for s in chart.series))
    for index, series in enumerate(chart.series):
        if series.group is not None:  # a comparison: colour by variant, dash by series
            color = PALETTE[groups.index(series.group) % len(PALETTE)]
            dash = DASHES[labels.index(series.name) % len(DASHES)]
            name = series.group if len(labels) == 1 else f"{series.group} · {series.name}"
        else:
            color, dash, name = PALETTE[index % len(PALETTE)], "solid", series.name
        if series.seeds > 1:
            name = f"{name} (n={series.seeds})"
        if series.mode == "bar":
            data.append(
                {"type": "bar", "x": list(chart.x_ticks or _values(series.x)), "y": _values(series.y), "name": name}
            )
        elif series.mode == "histogram":
            data.append(
                {
                    "type": "histogram",
                    "x": _values(series.y),
                    "histnorm": "probability density",
                    "nbinsx": 50,
                    "name": name,
                    "marker": {"color": color},
                    "opacity": 0.7,
                }
            )
        elif series.mode == "box":
            data.append({"type": "box", "y": _values(series.y), "name": name, "marker": {"color": color}})
        else:
            band = _band(series, color, name)
            if band is not None:
                data.append(band)
            trace: dict[str, Any] = {
                "type": "scatter",
                "mode": series.mode,
                "x": _values(series.x),
                "y": _values(series.y),
                "name": name,
                "legendgroup": name,
                "line": {"color": color, "dash": dash, "width": 2},
                "marker": {"color": color, "size": 5 if series.mode != "markers" else 4},
            }
            data.append(trace)
    if chart.x_ticks is not None and any(s.mode == "bar" for s in chart.series):
        layout["xaxis"]["type"] = "category"
    return {"data": data, "layout": layout}


# ---------------------------------------------------------------------------------------------------- html
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1f2328; }
header { background: #24292f; color: #fff; padding: 16px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 20px; }
header p { margin: 2px 0; font-size: 13px; color: #d0d7de; }
nav { padding: 8px 24px; border-bottom: 1px solid #d0d7de; font-size: 13px; position: sticky; top: 0;
      background: #fff; z-index: 10; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
main { padding: 8px 24px 40px 24px; }
h2 { font-size: 17px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 28px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.chart { border: 1px solid #eaeef2; border-radius: 6px; min-height: 380px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: right; }
th { background: #f6f8fa; }
td.name, th.name { text-align: left; }
.scroll { overflow: auto; max-height: 480px; max-width: 100%; }
.muted { color: #57606a; font-size: 13px; }
"""


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "") -> str:
    """A plain HTML table; the first column is left-aligned (names)."""
    head = "".join(f'<th class="{"name" if i == 0 else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"name" if i == 0 else ""}">{_cell(v)}</td>' for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    identifier = f' id="{html.escape(table_id)}"' if table_id else ""
    return f'<div class="scroll"><table{identifier}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def chart_element_id(chart: Chart) -> str:
    """The HTML id of a chart's element (stable: tests and links use it)."""
    return "chart-" + "".join(c if c.isalnum() else "-" for c in chart.id)


def report_html(
    title: str,
    subtitle: Sequence[str],
    charts: Sequence[Chart],
    tables: Sequence[tuple[str, str, str]],
    notes: Sequence[str] = (),
) -> str:
    """The whole page: header, one section per chart section, then ``tables`` (heading, anchor, HTML).

    plotly.js is inlined once; each chart is drawn from its figure dictionary by one script at the end.
    """
    from plotly.offline import get_plotlyjs
    from plotly.utils import PlotlyJSONEncoder

    sections: dict[str, list[Chart]] = {}
    for chart in charts:
        sections.setdefault(chart.section, []).append(chart)
    nav = "".join(f'<a href="#section-{i}">{html.escape(name)}</a>' for i, name in enumerate(sections))
    nav += "".join(f'<a href="#{html.escape(anchor)}">{html.escape(heading)}</a>' for heading, anchor, _ in tables)
    body = []
    figures = {}
    for index, (section, members) in enumerate(sections.items()):
        divs = []
        for chart in members:
            element = chart_element_id(chart)
            figures[element] = figure(chart)
            note = f'<p class="muted">{html.escape(chart.note)}</p>' if chart.note else ""
            divs.append(
                f'<div><div class="chart" id="{element}" data-chart-id="{html.escape(chart.id)}"></div>{note}</div>'
            )
        body.append(
            f'<section id="section-{index}"><h2>{html.escape(section)}</h2>'
            f'<div class="grid">{"".join(divs)}</div></section>'
        )
    for heading, anchor, content in tables:
        body.append(f'<section id="{html.escape(anchor)}"><h2>{html.escape(heading)}</h2>{content}</section>')
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        body.append(f'<section id="notes"><h2>Not drawn</h2><ul class="muted">{items}</ul></section>')
    header = "".join(f"<p>{html.escape(line)}</p>" for line in subtitle)
    payload = json.dumps(figures, cls=PlotlyJSONEncoder).replace("</", "<\\/")
    script = (
        "const FIGURES = " + payload + ";\n"
        "const CONFIG = {displaylogo: false, responsive: true};\n"
        "for (const [id, fig] of Object.entries(FIGURES)) {\n"
        "  Plotly.newPlot(document.getElementById(id), fig.data, fig.layout, CONFIG);\n"
        "}\n"
        "document.body.dataset.rendered = String(Object.keys(FIGURES).length);\n"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><header><h1>{html.escape(title)}</h1>{header}</header><nav>{nav}</nav>"
        f"<main>{''.join(body)}</main><script>{script}</script></body></html>\n"
    )


# ---------------------------------------------------------------------------------------------------- png
def write_pngs(charts: Sequence[Chart], folder: Path) -> list[Path]:
    """One PNG per chart, through Plotly's exporter (kaleido, which needs Chrome or Chromium installed)."""
    import plotly.io as pio

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{chart_element_id(chart).removeprefix('chart-')}.png" for chart in charts]
    try:
        pio.write_images([figure(chart) for chart in charts], paths, width=900, height=420, scale=2)
    except Exception as err:  # kaleido's errors for a missing browser vary by version: name the fix
        reason = " ".join(str(err).split())[:200]
        raise PlasticityConfigError(
            f"--png: Plotly could not export PNGs ({type(err).__name__}: {reason}); it needs Chrome or Chromium "
            "(e.g. apt-get install chromium); the HTML report needs neither"
        ) from None
    return paths
