"""Turns scripts/bench-fallbacks.sh's results into a table (medians over runs) and an SVG
of what each technique costs per delivered message, and writes both into
docs/PERFORMANCE.md between its fallbacks markers.

Usage: fallbacks_report.py RESULTS.jsonl PLOT.svg PERFORMANCE.md"""

import json
import math
import statistics
import sys
from collections import defaultdict
from html import escape

results_path, svg_path, doc_path = sys.argv[1:4]
rows = [json.loads(line) for line in open(results_path) if line.strip()]
by = defaultdict(list)
for r in rows:
    by[r["label"]].append(r)

TECHNIQUES = [
    ("ws", "WebSocket (STOMP)"),
    ("sockjs-xhr-streaming", "SockJS xhr-streaming (STOMP)"),
    ("sse", "Server-Sent Events + POST"),
    ("long-poll", "long polling + POST"),
    ("poll", "polling every 1 s + POST"),
]


def median(label, key):
    values = [r[key] for r in by.get(label, []) if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


table = [
    "| technique | p50 ms | p99 ms | bytes on the wire / delivery | HTTP requests / delivery "
    "| broker CPU µs / delivery | lost | at 50,000/s: p99 ms | bytes / delivery | broker CPU µs / delivery "
    "| highest rate sustained (deliveries/s) | p99 there (ms) | broker KiB per idle reader |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for key, name in TECHNIQUES:
    chat, busy, highest = f"chat-{key}", f"busy-{key}", f"highest-{key}"
    best = median(highest, "highest_rate_p99_under_limit")
    # The p99 of the last step that stayed under the limit.
    p99_there = None
    for r in by.get(highest, []):
        ok = [s for s in r.get("steps", []) if s.get("lost") == 0 and s.get("p99_ms", 1e9) <= r.get("p99_limit_ms", 50)]
        if ok:
            p99_there = ok[-1]["p99_ms"]
    idle = median(f"idle-{key}", "broker_kib_per_connection")
    table.append(
        f"| {name} | {fmt(median(chat, 'p50_ms'), 2)} | {fmt(median(chat, 'p99_ms'), 2)} "
        f"| {fmt(median(chat, 'wire_bytes_per_delivery'))} | {fmt(median(chat, 'requests_per_delivery'), 2)} "
        f"| {fmt(median(chat, 'broker_cpu_us_per_delivery'), 1)} | {fmt(median(chat, 'lost'))} "
        f"| {fmt(median(busy, 'p99_ms'), 1)} | {fmt(median(busy, 'wire_bytes_per_delivery'))} "
        f"| {fmt(median(busy, 'broker_cpu_us_per_delivery'), 2)} "
        f"| {fmt(best)} | {fmt(p99_there, 1)} | {fmt(idle, 1)} |"
    )

# The plot: one panel per cost, one bar per technique.
panels = [
    ("p99 latency at 2,000 deliveries/s (ms, log scale)", "chat", "p99_ms", True),
    ("bytes on the wire per delivery at 2,000 deliveries/s", "chat", "wire_bytes_per_delivery", False),
    ("HTTP requests per delivery at 2,000 deliveries/s", "chat", "requests_per_delivery", False),
    ("broker CPU per delivery at 50,000 deliveries/s (µs)", "busy", "broker_cpu_us_per_delivery", False),
    ("highest rate sustained (deliveries/s; p99 under 50 ms, 1,100 ms for polling)", "highest", "highest_rate_p99_under_limit", False),
]
colors = ["#2f6fed", "#7a4ed9", "#1f9d74", "#d98a1f", "#c94a4a"]
width, label_w, bar_h, gap = 760, 210, 16, 4
panel_h = len(TECHNIQUES) * (bar_h + gap) + 40
height = len(panels) * panel_h + 20
svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
    f'font-family="sans-serif" font-size="12">',
    f'<rect width="{width}" height="{height}" fill="white"/>',
]
for p, (title, prefix, key, log) in enumerate(panels):
    top = 10 + p * panel_h
    svg.append(f'<text x="10" y="{top + 14}" font-weight="bold">{escape(title)}</text>')
    values = [median(f"{prefix}-{k}", key) for k, _ in TECHNIQUES]
    present = [v for v in values if v is not None and v > 0]
    top_value = max(present) if present else 1
    scale_w = width - label_w - 90
    for i, ((_, name), v) in enumerate(zip(TECHNIQUES, values)):
        y = top + 24 + i * (bar_h + gap)
        svg.append(f'<text x="10" y="{y + 12}">{escape(name)}</text>')
        if v is None:
            svg.append(f'<text x="{label_w}" y="{y + 12}" fill="#888">not measured</text>')
            continue
        if log:
            low = min(present) / 2
            frac = (math.log10(max(v, low)) - math.log10(low)) / max(math.log10(top_value) - math.log10(low), 1e-9)
        else:
            frac = v / top_value if top_value else 0
        w = max(1, frac * scale_w)
        svg.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[i]}"/>')
        digits = 2 if v < 10 else 0
        svg.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{v:,.{digits}f}</text>')
svg.append("</svg>")
open(svg_path, "w").write("\n".join(svg) + "\n")

section = "\n".join(table)
doc = open(doc_path).read()
start, end = "<!-- fallbacks:start -->", "<!-- fallbacks:end -->"
if start in doc and end in doc:
    before = doc[: doc.index(start) + len(start)]
    after = doc[doc.index(end):]
    doc = f"{before}\n{section}\n\n![What each technique costs](fallbacks.svg)\n{after}"
    open(doc_path, "w").write(doc)
print(section)
