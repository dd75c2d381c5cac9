"""Turns scripts/bench.sh's results into a table (medians over runs, with stoa/RabbitMQ
ratios), an SVG plot of room latency percentiles, and the results section of
docs/PERFORMANCE.md (between its bench markers)."""

import json
import platform
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict

results_path, svg_path, doc_path = sys.argv[1:4]
rows = [json.loads(line) for line in open(results_path) if line.strip()]
by = defaultdict(list)
for r in rows:
    by[(r["label"], r["target"])].append(r)


def median(label, target, key):
    values = [r[key] for r in by.get((label, target), []) if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def ratio(a, b, higher_is_better=True):
    if not a or not b:
        return "—"
    return f"{(a / b if higher_is_better else b / a):.1f}×"


lines = []
metric_rows = [
    ("fanout, 100 WebSocket subscribers, 64 B", "fanout-100", "deliveries_per_sec", "deliveries/s", True, 0),
    ("fanout, 1,000 WebSocket subscribers, 64 B", "fanout-1000", "deliveries_per_sec", "deliveries/s", True, 0),
    ("durable queue, 8 publishers with receipts, 1 consumer", "queue", "receipted_per_sec", "messages/s", True, 0),
    ("rooms 100 × 10 at 20,000 deliveries/s: p50", "rooms-20k", "p50_ms", "ms", False, 2),
    ("rooms 100 × 10 at 20,000 deliveries/s: p99", "rooms-20k", "p99_ms", "ms", False, 2),
    ("rooms 100 × 10 at 100,000 deliveries/s: p50", "rooms-100k", "p50_ms", "ms", False, 2),
    ("rooms 100 × 10 at 100,000 deliveries/s: p99", "rooms-100k", "p99_ms", "ms", False, 2),
    ("19,000 WebSocket connections, each in a room of 10: connects", "conns-19000", "connects_per_sec", "connects/s", True, 0),
    ("19,000 WebSocket connections: broker memory each", "conns-19000", "broker_kib_per_connection", "KiB", False, 1),
    ("19,000 WebSocket connections, one per room (no join notice to others): connects", "conns-19000-alone", "connects_per_sec", "connects/s", True, 0),
    ("5,000 WebSocket connections, each in a room of 10: connects", "conns-5000", "connects_per_sec", "connects/s", True, 0),
    ("5,000 WebSocket connections: broker memory each", "conns-5000", "broker_kib_per_connection", "KiB", False, 1),
]
lines.append("| scenario | stoa | RabbitMQ | stoa vs RabbitMQ |")
lines.append("|---|---|---|---|")
for title, label, key, unit, higher, digits in metric_rows:
    s, r = median(label, "stoa", key), median(label, "rabbitmq", key)
    lines.append(f"| {title} ({unit}) | {fmt(s, digits)} | {fmt(r, digits)} | {ratio(s, r, higher)} |")

# Identity (issue #15): stoa's own modes against --auth none, same connections, same run.
auth_lines = ["| --auth, all connecting at once, one per room | connects/s | seconds for all | vs none |", "|---|---|---|---|"]
none_rate = median("auth-none", "stoa", "connects_per_sec")
for title, label in [
    ("none", "auth-none"),
    ("jwt (HS256)", "auth-jwt"),
    ("users, cold login cache (every login through Argon2id)", "auth-users-cold"),
    ("users, the same storm again within --login-cache-seconds", "auth-users-warm"),
]:
    rate = median(label, "stoa", "connects_per_sec")
    seconds = median(label, "stoa", "seconds")
    share = f"{rate / none_rate:.3g}×" if rate and none_rate else "—"
    auth_lines.append(f"| {title} | {fmt(rate)} | {fmt(seconds, 2)} | {share} |")
storm = next((r["connections"] for r in rows if r["label"] == "auth-none"), None)


def cpu_of(r):
    return r.get("cpu_percent") or r.get("cpu_percent_while_connecting") or {}


# Several nodes (issue #16): two nodes sharing Redis beside one node, same run.
cluster_lines = ["| scenario | one node | two nodes and Redis | two vs one | Redis commands per publish | lost (two nodes) |", "|---|---|---|---|---|---|"]
for title, one, two, key, unit, higher, digits in [
    ("fan-out, 1,000 subscribers, publisher on node a", "fanout-1000-one-node", "fanout-1000-two-nodes", "deliveries_per_sec", "deliveries/s", True, 0),
    ("rooms 100 × 10 at 10,000 deliveries/s, members on both nodes: p50", "rooms-10k-one-node", "rooms-10k-two-nodes", "p50_ms", "ms", False, 2),
    ("rooms 100 × 10 at 10,000 deliveries/s, members on both nodes: p99", "rooms-10k-one-node", "rooms-10k-two-nodes", "p99_ms", "ms", False, 2),
]:
    a, b = median(one, "stoa", key), median(two, "stoa-2-nodes", key)
    per = median(two, "stoa-2-nodes", "redis_commands_per_publish")
    lost = median(two, "stoa-2-nodes", "lost")
    share = (f"{b / a:.2f}×" if higher else f"{a / b:.2f}× as fast") if a and b else "—"
    cluster_lines.append(f"| {title} ({unit}) | {fmt(a, digits)} | {fmt(b, digits)} | {share} | {fmt(per, 2)} | {fmt(lost)} |")

cpu_lines = ["| scenario | broker under test | its CPU | generator CPU |", "|---|---|---|---|"]
for label, target in sorted(by):
    b = [cpu_of(r).get("broker") for r in by[(label, target)]]
    g = [cpu_of(r).get("generator") for r in by[(label, target)]]
    b = [v for v in b if isinstance(v, (int, float))]
    g = [v for v in g if isinstance(v, (int, float))]
    if b or g:
        cpu_lines.append(f"| {label} | {target} | {fmt(statistics.median(b)) + '%' if b else '—'} | {fmt(statistics.median(g)) + '%' if g else '—'} |")
losses = {(r["label"], r["target"]): r.get("lost", 0) for r in rows if r.get("lost")}
step = [r for r in rows if r["label"] == "rooms-step"]
best = step[-1].get("highest_rate_p99_under_50ms") if step else None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
runs = max((len(v) for v in by.values()), default=0)

# Latency plot: percentiles of the rooms scenario, stoa and RabbitMQ, log scale.
quantiles = [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"), ("max", "max_ms")]
series = [("stoa, 100k/s", "rooms-100k", "stoa", "#2f6fed"), ("stoa, 20k/s", "rooms-20k", "stoa", "#7aa5f5"), ("RabbitMQ, 20k/s", "rooms-20k", "rabbitmq", "#e4572e")]
import math
W, H, L, B, T = 640, 360, 60, 40, 30
values = [median(label, target, key) for _, label, target, _ in series for _, key in quantiles]
top = max([v for v in values if v] or [1.0])
bottom = 0.1
def y(v):
    v = max(v or bottom, bottom)
    return T + (H - T - B) * (1 - (math.log10(v) - math.log10(bottom)) / (math.log10(top * 1.5) - math.log10(bottom)))
def x(i):
    return L + i * (W - L - 20) / (len(quantiles) - 1)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle" font-size="14">Room message latency, 100 rooms × 10 members (ms, log scale)</text>']
for tick in [0.1, 1, 10, 100, 1000, 10000]:
    if tick <= top * 1.5:
        svg.append(f'<line x1="{L}" x2="{W-20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{L-6}" y="{y(tick)+4:.1f}" text-anchor="end">{tick:g}</text>')
for i, (name, _) in enumerate(quantiles):
    svg.append(f'<text x="{x(i):.1f}" y="{H-B+18}" text-anchor="middle">{name}</text>')
for k, (name, label, target, color) in enumerate(series):
    pts = [(x(i), y(median(label, target, key))) for i, (_, key) in enumerate(quantiles) if median(label, target, key)]
    if pts:
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2.5" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        # Lower right: the slow lines run along the top, the fast ones start low on the left.
        svg.append(f'<text x="{W-170}" y="{H-B-56+16*k}" fill="{color}">{name}</text>')
svg.append("</svg>")
open(svg_path, "w").write("\n".join(svg))
shutil.copy(svg_path, "docs/latency.svg")

section = [
    "<!-- bench:start -->",
    f"Measured by `RUNS={runs} scripts/bench.sh` (medians of {runs} runs, stoa and RabbitMQ alternating in the same run).",
    f"Machine: {cpu}, {platform.machine()}, {mem} memory, 2 cores; the broker under test pinned to CPU 0 (`taskset`), the",
    "load generator (`stoa-cli bench`, release build) to CPU 1. RabbitMQ is Debian's "
    + (subprocess.run(["sh", "-c", "dpkg-query -W -f '${Version}' rabbitmq-server"], capture_output=True, text=True).stdout or "rabbitmq-server")
    + " with rabbitmq_web_stomp (WebSocket scenarios) and rabbitmq_stomp (the durable queue, `persistent:true`).",
    "",
    *lines,
    "",
    f"Highest room rate with p99 under 50 ms (stoa, stepping by 1.5×): {fmt(best) if isinstance(best, (int, float)) else '—'} deliveries/s.",
    f"Losses: {'none' if not losses else ', '.join(f'{k[1]} {k[0]}: {v}' for k, v in losses.items())}.",
    "",
    f"Identity (`--auth`): {fmt(storm)} connections at once, each its own account or token and its own room, on a fresh broker each;",
    "the ratio is against `--auth none` measured the same way in the same run.",
    "",
    *auth_lines,
    "",
    "Several nodes (`scripts/bench-cluster.sh`, part of this run): two stoa nodes and their redis-server together on",
    "CPU 0 (the one core a single node has), the generator on CPU 1; a fresh single node measured the same way in the",
    "same run. Redis's commands are its own count (`INFO commandstats`) over the run, divided by the messages",
    "published (heartbeats and joins included).",
    "",
    *cluster_lines,
    "",
    "CPU of the broker under test and of the generator while each scenario ran (percent of one core;",
    "the side at or near 100% is the limit of that row):",
    "",
    *cpu_lines,
    "",
    "![Room latency percentiles](latency.svg)",
    "<!-- bench:end -->",
]
doc = open(doc_path).read()
start, end = doc.find("<!-- bench:start -->"), doc.find("<!-- bench:end -->")
if start >= 0 and end >= 0:
    doc = doc[:start] + "\n".join(section) + doc[end + len("<!-- bench:end -->"):]
else:
    doc += "\n## Side by side with RabbitMQ (issues #6, #7)\n\n" + "\n".join(section) + "\n"
open(doc_path, "w").write(doc)
print("\n".join(lines + [""] + auth_lines + [""] + cluster_lines + [""] + cpu_lines))
