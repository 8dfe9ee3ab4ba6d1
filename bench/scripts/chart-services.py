"""Draws the library against the naive service as users meet them, over HTTP (requests/s, by
connections) and from Kafka (records/s), as grouped bars in one SVG; medians of the rounds.

Usage: python3 bench/scripts/chart-services.py bench/results/http.jsonl bench/results/kafka.jsonl bench/results/services.svg
Standard library only, so it runs wherever the benchmark does.
"""
import json
import statistics
import sys


def groups(http_path, kafka_path):
    """[(label, library value, naive value, unit)], medians of each measurement's rounds."""
    http = [json.loads(line) for line in open(http_path) if line.strip().startswith("{")]
    out = []
    for connections in sorted({r["connections"] for r in http}):
        def median(service):
            values = [r["requests_per_sec"] for r in http if r["service"] == service and r["connections"] == connections]
            return statistics.median(values) if values else 0.0
        out.append((f"HTTP, {connections} connections", median("http_service"), median("http_naive"), "requests/s"))
    kafka = [json.loads(line) for line in open(kafka_path) if line.strip().startswith("{")]
    def median_mode(mode):
        values = [r["records_per_s"] for r in kafka if r.get("mode") == mode]
        return statistics.median(values) if values else 0.0
    out.append(("Kafka topic to state", median_mode("ingest"), median_mode("naive"), "records/s"))
    return out


def main(http_path, kafka_path, target):
    data = groups(http_path, kafka_path)
    width, height, left, bottom, top, right = 640, 360, 60, 60, 40, 20
    ymax = max(max(lib, naive) for _, lib, naive, _ in data) * 1.15
    slot = (width - left - right) / len(data)
    bar = slot / 3
    def y(v):
        return height - bottom - v / ymax * (height - bottom - top)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">the library (blue) against the naive service (red), one machine</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>']
    for i, (label, lib, naive, unit) in enumerate(data):
        x0 = left + i * slot + bar / 2
        for j, (value, colour) in enumerate(((lib, "#1f77b4"), (naive, "#d62728"))):
            x = x0 + j * bar
            out.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar * 0.9:.1f}" height="{height - bottom - y(value):.1f}" fill="{colour}"/>')
            out.append(f'<text x="{x + bar * 0.45:.1f}" y="{y(value) - 4:.1f}" text-anchor="middle">{value:,.0f}</text>')
        out.append(f'<text x="{x0 + bar:.1f}" y="{height - bottom + 18}" text-anchor="middle">{label}</text>')
        ratio = lib / naive if naive else float("nan")
        out.append(f'<text x="{x0 + bar:.1f}" y="{height - bottom + 34}" text-anchor="middle">{unit}, {ratio:.1f}x</text>')
    out.append("</svg>")
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
