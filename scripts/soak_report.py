"""Turns scripts/bench-soak.sh's result into a plot of the broker's memory and descriptors
over time and the soak section of docs/PERFORMANCE.md (between its soak markers).

Usage: soak_report.py SOAK.json PLOT.svg PERFORMANCE.md"""

import json
import sys
from html import escape

result_path, svg_path, doc_path = sys.argv[1:4]
r = json.load(open(result_path))
samples = [s for s in r["samples"] if s.get("rss_kib") is not None]
warm = r["seconds"] * 0.25

width, height, left, top, plot_w, plot_h = 760, 320, 70, 30, 620, 220
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
       f'<rect width="{width}" height="{height}" fill="white"/>',
       f'<text x="{left}" y="18" font-weight="bold">{escape("broker RSS (MiB, blue) and open descriptors (orange) over the soak")}</text>']
if samples:
    t_max = max(s["seconds"] for s in samples) or 1
    rss = [s["rss_kib"] / 1024 for s in samples]
    fds = [s.get("fds") or 0 for s in samples]
    r_max = max(rss) * 1.1 or 1
    f_max = max(fds) * 1.1 or 1
    x = lambda t: left + t / t_max * plot_w
    svg.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>')
    svg.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>')
    wx = x(warm)
    svg.append(f'<line x1="{wx:.1f}" y1="{top}" x2="{wx:.1f}" y2="{top + plot_h}" stroke="#aaa" stroke-dasharray="4"/>')
    svg.append(f'<text x="{wx + 4:.1f}" y="{top + 12}" fill="#777">warm-up ends</text>')
    for values, top_value, color in [(rss, r_max, "#2f6fed"), (fds, f_max, "#d98a1f")]:
        points = " ".join(f"{x(s['seconds']):.1f},{top + plot_h - v / top_value * plot_h:.1f}" for s, v in zip(samples, values))
        svg.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    svg.append(f'<text x="{left - 8}" y="{top + 4}" text-anchor="end" fill="#2f6fed">{r_max:.0f}</text>')
    svg.append(f'<text x="{left + plot_w + 4}" y="{top + 4}" fill="#d98a1f">{f_max:.0f}</text>')
    svg.append(f'<text x="{left + plot_w}" y="{top + plot_h + 16}" text-anchor="end">{t_max:.0f} s</text>')
svg.append("</svg>")
open(svg_path, "w").write("\n".join(svg) + "\n")

def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"

after = [s for s in samples if s["seconds"] >= warm]
rss_range = (min(s["rss_kib"] for s in after) / 1024, max(s["rss_kib"] for s in after) / 1024) if after else (None, None)
fd_range = (min(s["fds"] for s in after), max(s["fds"] for s in after)) if after else (None, None)
lines = [
    f"| run | room messages sent / received | missed | direct messages sent / lost | rejoins | reconnects | RSS after warm-up (MiB) | growth | descriptors after warm-up | growth |",
    "|---|---|---|---|---|---|---|---|---|---|",
    f"| {r['seconds'] / 60:.0f} min, {r['rooms']} rooms × {r['members']}, {r['rate']:,.0f} msg/s | {r['room_sent']:,} / {r['room_received']:,} | {r['room_missed']} "
    f"| {r['dm_sent']:,} / {r['dm_lost']} | {r['rejoins']:,} | {r['reconnects']:,} | {fmt(rss_range[0])}–{fmt(rss_range[1])} "
    f"| {fmt(r['rss_growth_after_warm_up_percent'])}% | {fd_range[0]}–{fd_range[1]} | {fmt(r['fds_growth_after_warm_up_percent'])}% |",
]
section = "\n".join(lines)
doc = open(doc_path).read()
start, end = "<!-- soak:start -->", "<!-- soak:end -->"
if start in doc and end in doc:
    doc = doc[: doc.index(start) + len(start)] + f"\n{section}\n\n![RSS and descriptors over the soak](soak.svg)\n" + doc[doc.index(end):]
    open(doc_path, "w").write(doc)
print(section)
