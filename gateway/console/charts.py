"""Small SVG charts drawn in Python for the health page.

Why not a charting library: the console ships every asset in the package and loads no
JavaScript, and matplotlib is only in the ``train`` extra. A line chart of counts per hour and a
bar chart of flag rates are a few dozen SVG elements. Every label is escaped here (caller AE
titles come from the network).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def line_chart(labels: Sequence[str], series: dict[str, Sequence[float]], *, width: int = 720,
               height: int = 220, title: str = "") -> str:
    """Counts over time: one polyline per series, x = ``labels`` (hours), a legend."""
    left, right, top, bottom = 44, 12, 24, 34
    w, h = width - left - right, height - top - bottom
    peak = max([1.0, *(v for values in series.values() for v in values)])
    n = max(1, len(labels) - 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<title>{escape(title)}</title>',
             f'<text x="{left}" y="14" class="chart-title">{escape(title)}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = top + h - frac * h
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}" '
                     'class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" '
                     f'class="axis">{peak * frac:.3g}</text>')
    step = max(1, len(labels) // 6)
    for i in range(0, len(labels), step):
        x = left + i * w / n
        parts.append(f'<text x="{x:.1f}" y="{height - 18}" text-anchor="middle" '
                     f'class="axis">{escape(labels[i][-5:])}</text>')
    for k, (name, values) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = " ".join(f"{left + i * w / n:.1f},{top + h - v / peak * h:.1f}"
                          for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{points}" data-series="{escape(name)}"/>')
        lx = left + k * 120
        parts.append(f'<rect x="{lx}" y="{height - 12}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{lx + 14}" y="{height - 3}" '
                     f'class="legend">{escape(name)} ({sum(values):.0f})</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(rows: Sequence[tuple[str, float, str]], *, width: int = 720,
              title: str = "") -> str:
    """Horizontal bars in [0, 1]: (label, value, note) per row, e.g. a flag rate per caller."""
    row_h, left, top = 22, 160, 24
    height = top + row_h * max(1, len(rows)) + 8
    w = width - left - 120
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<title>{escape(title)}</title>',
             f'<text x="4" y="14" class="chart-title">{escape(title)}</text>']
    if not rows:
        parts.append(f'<text x="{left}" y="{top + 14}" class="axis">no data</text>')
    for i, (label, value, note) in enumerate(rows):
        y = top + i * row_h
        bw = max(0.0, min(1.0, value)) * w
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" '
                     f'class="legend">{escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 6}" '
                     f'fill="{PALETTE[1]}"/>')
        parts.append(f'<text x="{left + bw + 6:.1f}" y="{y + 15}" class="legend">'
                     f'{value:.1%} {escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)
