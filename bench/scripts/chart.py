"""Draws commands/s against concurrency, actors and naive, from bench/results/results.jsonl as SVG.

Usage: python3 bench/scripts/chart.py bench/results/results.jsonl bench/results/throughput.svg
Standard library only, so it runs wherever the benchmark does.
"""
import json
import math
import sys


def sweep_points(rows, mode):
    """The runs of `mode` that are uniform, unpaced and without the change feed; at a concurrency
    measured more than once, the first (the headline run)."""
    points = {}
    for row in rows:
        plain = row.get("skew") == 0.0 and row.get("rate") is None and not row.get("change_feed")
        if row.get("mode") == mode and plain and "commands_per_sec" in row:
            points.setdefault(row["concurrency"], row["commands_per_sec"])
    return sorted(points.items())


def main(source, target):
    rows = [json.loads(line) for line in open(source) if line.strip().startswith("{")]
    series = {"actors": ("#1f77b4", sweep_points(rows, "actors")), "naive": ("#d62728", sweep_points(rows, "naive"))}
    width, height, left, bottom, top, right = 640, 400, 80, 50, 30, 120
    xs = sorted({c for _, (_, pts) in series.items() for c, _ in pts})
    ymax = max([v for _, (_, pts) in series.items() for _, v in pts] or [1]) * 1.1
    def x(c):
        span = math.log2(xs[-1]) - math.log2(xs[0]) or 1
        return left + (math.log2(c) - math.log2(xs[0])) / span * (width - left - right)
    def y(v):
        return height - bottom - v / ymax * (height - bottom - top)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">commands/s against commands in flight (PostgreSQL, uniform users)</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for c in xs:
        out.append(f'<text x="{x(c):.1f}" y="{height - bottom + 18}" text-anchor="middle">{c}</text>')
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">concurrency (log scale)</text>')
    for i, (name, (color, pts)) in enumerate(series.items()):
        if pts:
            path = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            out.extend(f'<circle cx="{x(c):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>' for c, v in pts)
        out.append(f'<text x="{width - right + 10}" y="{top + 20 + 18 * i}" fill="{color}">{name}</text>')
    out.append("</svg>")
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
