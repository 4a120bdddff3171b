"""SVG charts for the HTML pages NeuroFlux writes: inline, no script.

``bar_chart`` draws horizontal bars, predicted and optionally measured, against an optional limit line
(``nf-graph``'s plan page). ``line_chart`` draws series over a log-scaled x axis (``nf-plan --sweep``'s
``sweep.html``). Both are built from ``element`` and ``svg``, which write attributes in the order given and
values as given; the charts escape every text they are handed (titles, labels, formatted values).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

__all__ = ["bar_chart", "element", "line_chart", "svg"]

_SVG_NS = "http://www.w3.org/2000/svg"


def _attrs(attrs: dict[str, object]) -> str:
    """`` name="value"`` pairs; a keyword's trailing ``_`` is dropped and ``_`` becomes ``-`` (``class_``,
    ``text_anchor``)."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{v}"' for k, v in attrs.items())


def element(name: str, body: str | None = None, /, **attrs: object) -> str:
    """``<name a="v">body</name>``, or ``<name a="v"/>`` without a body. ``body`` and the values are written
    as given: escape text before."""
    return f"<{name}{_attrs(attrs)}/>" if body is None else f"<{name}{_attrs(attrs)}>{body}</{name}>"


def svg(width: int, height: int, children: Sequence[str], **attrs: object) -> str:
    """An ``<svg>`` document of ``width`` x ``height`` pixels holding ``children``, one per line."""
    return "\n".join(
        [f"<svg{_attrs({'xmlns': _SVG_NS, 'width': width, 'height': height, **attrs})}>", *children, "</svg>"]
    )


def bar_chart(
    title: str,
    rows: Sequence[tuple[str, float, float | None]],
    *,
    limit: float | None,
    fmt: Callable[[float], str],
    limit_label: str = "budget",
) -> str:
    """Horizontal bars, one row per ``(label, predicted, measured or None)``: the predicted bar above, the
    measured one below it, each with its value (``fmt``) beside it; ``limit``, when given, is a dashed line
    across the rows, labelled ``limit_label`` and its value."""
    w, label_w, row_h = 760, 90, 34
    top = 30
    h = top + row_h * len(rows) + 30
    vmax = max([limit or 0] + [max(p, m or 0) for _, p, m in rows]) or 1.0
    scale = (w - label_w - 110) / vmax
    min_w = 6.0  # a block far cheaper than the others still shows a bar (its value is printed beside it)

    def bar(kind: str, value: float, *, y: int, height: int, text_dy: int, text: str) -> list[str]:
        width = max(min_w, value * scale)
        tip = element("title", html.escape(f"{'predicted' if kind == 'pred' else 'measured'} {fmt(value)}"))
        return [
            element("rect", tip, class_=f"bar {kind}", x=label_w, y=y, width=f"{width:.1f}", height=height),
            element(
                "text",
                html.escape(text),
                x=f"{label_w + width + 6:.1f}",
                y=y + text_dy,
                class_="v" if kind == "pred" else "v m",
            ),
        ]

    parts = [element("text", html.escape(title), x=0, y=18, class_="t")]
    for i, (label, pred, meas) in enumerate(rows):
        y = top + i * row_h
        parts.append(element("text", html.escape(label), x=0, y=y + 18, class_="l"))
        parts += bar("pred", pred, y=y + 4, height=12, text_dy=11, text=fmt(pred))
        if meas is not None:
            parts += bar("meas", meas, y=y + 18, height=10, text_dy=9, text=f"{fmt(meas)} measured")
    if limit is not None:
        x = label_w + limit * scale
        parts.append(element("line", x1=f"{x:.1f}", y1=top - 4, x2=f"{x:.1f}", y2=h - 24, class_="limit"))
        parts.append(
            element(
                "text",
                html.escape(f"{limit_label} {fmt(limit)}"),
                x=f"{x - 4:.1f}",
                y=h - 8,
                class_="v lim",
                text_anchor="end",
            )
        )
    return svg(w, h, parts, role="img", aria_label=html.escape(title))


def line_chart(
    *,
    ticks: Sequence[tuple[str, float]],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    x_title: str,
    y_title: str,
) -> str:
    """Series over a log-scaled x axis. ``ticks``: one ``(label, x)`` per position, x > 0; ``series``: ``(name,
    colour, ys)`` with one y per tick, where None or 0 leaves the point out. At least one y must be drawn."""
    w, h, pad = 720, 360, 60
    xs = [math.log(x) for _, x in ticks]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymax = max(y for _, _, ys in series for y in ys if y) * 1.1

    def px(x: float) -> float:
        return pad + (math.log(x) - x0) / (x1 - x0) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - y / ymax * (h - 2 * pad)

    parts = [
        element("line", x1=pad, y1=h - pad, x2=w - pad, y2=h - pad, stroke="#333"),
        element("line", x1=pad, y1=pad, x2=pad, y2=h - pad, stroke="#333"),
        element("text", html.escape(x_title), x=w / 2, y=h - 15, text_anchor="middle"),
        element("text", html.escape(y_title), x=15, y=h / 2, transform=f"rotate(-90 15 {h / 2})", text_anchor="middle"),
    ]
    parts += [
        element("text", html.escape(label), x=f"{px(x):.1f}", y=h - pad + 16, text_anchor="middle")
        for label, x in ticks
    ]
    for i in range(5):
        y = ymax * i / 4
        parts.append(element("text", f"{y:.0f}", x=pad - 6, y=f"{py(y) + 4:.1f}", text_anchor="end"))
    for k, (name, colour, ys) in enumerate(series):
        line = [(px(x), py(y)) for (_, x), y in zip(ticks, ys) if y]
        if line:
            parts.append(
                element(
                    "polyline",
                    fill="none",
                    stroke=colour,
                    stroke_width=2,
                    points=" ".join(f"{x:.1f},{y:.1f}" for x, y in line),
                )
            )
            parts += [element("circle", cx=f"{x:.1f}", cy=f"{y:.1f}", r=3, fill=colour) for x, y in line]
        parts.append(element("text", html.escape(name), x=w - pad - 150, y=pad + 16 * k, fill=colour))
    return svg(w, h, parts, font_family="sans-serif", font_size=12)
