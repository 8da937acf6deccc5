"""Where the device time of a ``jax.profiler`` trace goes, as a Markdown table.

usage: python experiments/profile_summary.py TRACE [--top 15]

TRACE is a folder written by ``jax.profiler.trace`` / ``benchmark.py --profile`` (every
``*.trace.json.gz`` under it is read) or one such file. For every measured region that the
benchmark marks with a ``TraceAnnotation`` whose name ends in ``/timed`` (``curve_step/timed``,
``sweep/vmap/timed``, ...), it reports the wall time of the region, the device kernels that
ran inside it (count, busy time as the union of their intervals, busy share of the wall
time, mean kernel duration) and the kernels that took most of the busy time, grouped by name.
Kernels are the events of the device's stream lines ("Stream #..."); derived lines such as
"XLA Ops" or "XLA Modules" are left out so nothing is counted twice. Without a device line
(a CPU trace) it says so.

Only the trace's own JSON is read (no TensorBoard or xprof needed), so it runs where the
trace was taken, and a summary comes back even when the trace itself is too large to.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

DERIVED = ("XLA Ops", "XLA Modules", "Steps", "Framework", "Source", "TensorFlow")


def trace_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {path} (a jax.profiler.trace folder?)")
    return files


def load_events(path: Path) -> tuple[list[dict], dict, dict]:
    """(complete events, pid -> process name, (pid, tid) -> thread name)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads, complete = {}, {}, []
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "X" and "dur" in e:
            complete.append(e)
    return complete, procs, threads


def kernel_events(events, procs, threads) -> list[dict]:
    """Events on the stream lines of device processes ("/device:GPU:0", ...)."""
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}
    lines = {key: name for key, name in threads.items() if key[0] in device_pids}
    streams = {key for key, name in lines.items() if name.startswith("Stream")}
    if not streams:  # other naming: every device line that is not a derived one
        streams = {key for key, name in lines.items() if not name.startswith(DERIVED)}
    return [e for e in events if (e["pid"], e.get("tid")) in streams]


def regions(events) -> list[dict]:
    """The benchmark's timed regions (TraceAnnotations named '.../timed')."""
    return sorted((e for e in events if str(e.get("name", "")).endswith("/timed")),
                  key=lambda e: e["ts"])


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def short_name(name: str) -> str:
    """Kernel names without template arguments and parameter lists."""
    name = re.sub(r"<.*>", "<>", name)
    name = re.sub(r"\(.*\)", "()", name)
    return name if len(name) <= 80 else name[:77] + "..."


def summarize_region(region: dict, kernels: list[dict], top: int) -> list[str]:
    lo, hi = region["ts"], region["ts"] + region["dur"]
    inside = [k for k in kernels if lo <= k["ts"] and k["ts"] + k["dur"] <= hi]
    wall_ms = region["dur"] / 1e3
    lines = [f"### {region['name']}: {wall_ms:.1f} ms wall", ""]
    if not inside:
        lines += ["no device kernels inside this region", ""]
        return lines
    busy_ms = busy_time([(k["ts"], k["ts"] + k["dur"]) for k in inside]) / 1e3
    summed_ms = sum(k["dur"] for k in inside) / 1e3
    lines += [
        f"- kernels: {len(inside):,}; device busy {busy_ms:.1f} ms "
        f"({100 * busy_ms / wall_ms:.0f}% of the wall time); mean kernel "
        f"{1e3 * summed_ms / len(inside):.1f} us",
        "",
        "| kernel | count | total (ms) | share of busy | mean (us) |",
        "|---|---|---|---|---|",
    ]
    groups = collections.defaultdict(lambda: [0, 0.0])
    for k in inside:
        g = groups[short_name(k["name"])]
        g[0] += 1
        g[1] += k["dur"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    for name, (count, dur) in ranked[:top]:
        lines.append(f"| `{name}` | {count:,} | {dur / 1e3:.2f} | "
                     f"{100 * dur / 1e3 / summed_ms:.1f}% | {dur / count:.1f} |")
    rest = ranked[top:]
    if rest:
        count = sum(c for _, (c, _) in rest)
        dur = sum(d for _, (_, d) in rest)
        lines.append(f"| ({len(rest)} other names) | {count:,} | {dur / 1e3:.2f} | "
                     f"{100 * dur / 1e3 / summed_ms:.1f}% | {dur / count:.1f} |")
    lines.append("")
    return lines


def summary(path: Path, top: int = 15) -> str:
    out = [f"## Profile summary ({path})", ""]
    for f in trace_files(path):
        events, procs, threads = load_events(f)
        kernels = kernel_events(events, procs, threads)
        label = f.relative_to(path) if path.is_dir() else f.name
        out += [f"Trace {label}: {len(events):,} events, {len(kernels):,} device kernels", ""]
        if not kernels:
            out += ["no device stream lines in this trace (a CPU run?)", ""]
            continue
        marked = regions(events)
        if not marked:
            marked = [{"name": "whole trace", "ts": min(k["ts"] for k in kernels),
                       "dur": max(k["ts"] + k["dur"] for k in kernels)
                       - min(k["ts"] for k in kernels)}]
        for region in marked:
            out += summarize_region(region, kernels, top)
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, help="jax.profiler trace folder or .trace.json.gz")
    p.add_argument("--top", type=int, default=15, help="kernel names listed per region")
    args = p.parse_args(argv)
    if not args.trace.exists():
        raise SystemExit(f"{args.trace} does not exist")
    print(summary(args.trace, args.top))


if __name__ == "__main__":
    sys.exit(main())
