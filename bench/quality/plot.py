"""A small SVG line plot (no plotting library needed): accuracy against prompt length, one line per init.

python -m bench.quality.plot bench/results/quality.json docs/quality-lengths.svg
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def series(results: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """init -> [(P, accuracy)] from prompt-tuning rows (the latest result wins per init and length)."""
    points: dict[str, dict[int, float]] = {}
    for r in results:
        if r["method"].startswith("prompt tuning, init "):
            init = r["method"].removeprefix("prompt tuning, init ")
            points.setdefault(init, {})[r["length"]] = r[key]
    return {init: sorted(p.items()) for init, p in points.items()}


def svg(lines: dict[str, list[tuple[int, float]]], references: dict[str, float], title: str) -> str:
    width, height, left, right, top, bottom = 640, 400, 60, 170, 40, 50
    xs = sorted({p for pts in lines.values() for p, _ in pts})
    ys = [a for pts in lines.values() for _, a in pts] + list(references.values())
    low, high = math.floor(min(ys) * 20) / 20, math.ceil(max(ys) * 20) / 20
    span_x = (math.log(max(xs)) - math.log(min(xs))) or 1.0

    def x_of(p: int) -> float:
        return left + (math.log(p) - math.log(min(xs))) / span_x * (width - left - right)

    def y_of(a: float) -> float:
        return top + (high - a) / ((high - low) or 1.0) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{html.escape(title)}</text>',
    ]
    steps = round((high - low) / 0.05)
    for i in range(steps + 1):
        a = low + i * 0.05
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y_of(a):.1f}" y2="{y_of(a):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y_of(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}%</text>')
    for p in xs:
        out.append(f'<text x="{x_of(p):.1f}" y="{height - bottom + 18}" text-anchor="middle">{p}</text>')
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">prompt length P (log scale)</text>'
    )
    legend = top
    for i, (name, value) in enumerate(references.items()):
        y = y_of(value)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" stroke-dasharray="{4 + 2 * i},4"/>'
        )
        out.append(f'<text x="{width - right + 8}" y="{y + 4:.1f}" fill="#555">{name}</text>')
    for i, (init, pts) in enumerate(sorted(lines.items())):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{x_of(p):.1f},{y_of(a):.1f}" for p, a in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p, a in pts:
            out.append(
                f'<circle cx="{x_of(p):.1f}" cy="{y_of(a):.1f}" r="4" fill="{colour}"><title>{init}, P={p}: {100 * a:.1f}%</title></circle>'
            )
        legend += 18
        out.append(f'<circle cx="{width - right + 14}" cy="{legend - 4}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{width - right + 24}" y="{legend}">init {init}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(source: Path, target: Path) -> None:
    results = json.loads(source.read_text())
    lines = series(results, "in_domain")
    latest = {r["method"]: r["in_domain"] for r in results}
    references = {
        name: latest[method]
        for name, method in (("zero-shot", "zero-shot (template only)"), ("model tuning", "model tuning (all weights)"))
        if method in latest
    }
    target.write_text(svg(lines, references, "Pang & Lee sentence polarity, SmolLM2-135M, accuracy on 1,000 test sentences"))
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
