"""The chart of disclosures per recipient over time: stacked bars drawn as SVG on the server
(no JavaScript), one bar per day, or per month when the days would not fit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from html import escape

from markupsafe import Markup

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MAX_DAYS = 62  # more days than this: one bar per month
WIDTH, HEIGHT = 900, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40


@dataclass(frozen=True)
class Series:
    recipient: str
    colour: str
    total: int


def _months(first: date, last: date) -> list[str]:
    months, year, month = [], first.year, first.month
    while (year, month) <= (last.year, last.month):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def buckets(daily: list[tuple[str, str, int]]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The time buckets (every day or month from the first to the last, gaps included) and
    per bucket the count per recipient."""
    if not daily:
        return [], {}
    days = sorted({date.fromisoformat(d) for d, _, _ in daily})
    first, last = days[0], days[-1]
    by_month = (last - first).days >= MAX_DAYS
    if by_month:
        labels = _months(first, last)
    else:
        labels = [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    counts: dict[str, dict[str, int]] = {label: {} for label in labels}
    for day, recipient, n in daily:
        label = day[:7] if by_month else day
        counts[label][recipient] = counts[label].get(recipient, 0) + n
    return labels, counts


def axis(value: int) -> tuple[int, int]:
    """A round step (1, 2 or 5 times a power of ten) giving at most 5 gridlines, and the
    axis maximum: the first multiple of the step at or above `value`."""
    magnitude = 1
    while True:
        for m in (1, 2, 5):
            step = m * magnitude
            if step * 5 >= value:
                return step, max(step, -(-value // step) * step)
        magnitude *= 10


def disclosure_chart(daily: list[tuple[str, str, int]], title: str, empty: str) -> Markup:
    """The SVG (inline markup) for (day, recipient, count) rows; `title` labels it for screen
    readers, `empty` is shown when there is nothing to draw."""
    labels, counts = buckets(daily)
    if not labels:
        return Markup(f'<p class="empty">{escape(empty)}</p>')
    totals: dict[str, int] = {}
    for per_recipient in counts.values():
        for recipient, n in per_recipient.items():
            totals[recipient] = totals.get(recipient, 0) + n
    series = [
        Series(r, PALETTE[i % len(PALETTE)], totals[r])
        for i, r in enumerate(sorted(totals, key=lambda r: (-totals[r], r)))
    ]
    step, top = axis(max(sum(c.values()) for c in counts.values()))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(labels)
    bar = max(1.0, slot * 0.8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for value in range(0, top + 1, step):
        y = TOP + plot_h - plot_h * value / top
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
            f'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#444">{value}</text>'
        )
    every = max(1, round(len(labels) / 12))
    for i, label in enumerate(labels):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        for s in series:
            n = counts[label].get(s.recipient, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{s.colour}"><title>{escape(label)} {escape(s.recipient or "?")}: {n}'
                "</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
                f'font-size="11" fill="#444">{escape(label)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg width="12" height="12" aria-hidden="true"><rect width="12" height="12" '
        f'fill="{s.colour}"/></svg> {escape(s.recipient or "?")} ({s.total})</li>'
        for s in series
    )
    return Markup("".join(parts) + f'<ul class="legend">{legend}</ul>')
