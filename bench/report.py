"""A run's results as files: ``results.json``, ``results.md`` and three plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The percentiles every table shows; wrk reports these (and 1..99 for the CDF).
SHOWN = ("50", "90", "99", "99.9")


#: The offered load whose goodput the overload table compares against.
OVERLOAD_REFERENCE = 200


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out)


def _points(results: dict[str, Any], **match: object) -> list[dict[str, Any]]:
    return [p for p in results["points"] if all(p[k] == v for k, v in match.items())]


def _pct(point: dict[str, Any], p: str) -> float:
    """The latency percentile, NaN when no request was answered at all."""
    if not point["load"]["requests"]:
        return float("nan")
    return float(point["load"]["percentiles_ms"][p])


def _non_2xx(point: dict[str, Any]) -> str:
    bad = {s: n for s, n in point["load"]["statuses"].items() if not s.startswith("2")}
    return ", ".join(f"{n} x {s}" for s, n in sorted(bad.items())) or "-"


def _socket_errors(point: dict[str, Any]) -> str:
    errors = {k: v for k, v in point["load"]["socket_errors"].items() if v}
    return ", ".join(f"{v} {k}" for k, v in errors.items()) or "0"


def _error_rate(point: dict[str, Any]) -> float:
    load = point["load"]
    return 1 - load["statuses"].get("200", 0) / max(1, load["requests"])


def _trio(point: dict[str, Any], key: str) -> str:
    r = point["resources"]
    return f"{r['before'][key]} / {r['peak'][key]} / {r['after'][key]} / {r['after_idle'][key]}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    ideal = results["ideal"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"Python {m['python']}; load average {m['load_average_at_start'][0]:.2f} at the "
        f"start, {m['load_average_at_end'][0]:.2f} at the end; {m['wall_s']} s in all"
        + (" (BENCH_QUICK)." if results["quick"] else "."),
        "Simulator, smart (or the naive baseline), wrk: all on this machine, 127.0.0.1; "
        "2 gunicorn gevent workers with gunicorn.conf.py. Latencies in ms; CPU is all "
        "gunicorn processes' user + system time per request.",
        "",
    ]
    for mode, title in (
        ("fixed", "Fixed 100 ms, always 200"),
        ("random", "Random 100-600 ms, 20% failures"),
    ):
        points = _points(results, scenario=mode)
        if not points:
            continue
        ref = ideal[mode]
        lines += [
            f"## {title}",
            "",
            "Ideal hedger: "
            + ", ".join(f"p{p} {ref['p' + p]:.0f}" for p in SHOWN)
            + f", {ref['calls_per_request']:.2f} calls per request, "
            f"error rate {ref['error_rate']:.2%}.",
            "",
            "| server | conns | req/s | 200/s | p50 | p90 | p99 | p99.9 | max | non-2xx | "
            "socket errors | calls/req | CPU µs/req |",
            "| --- " + "| ---: " * 8 + "| --- | --- | ---: | ---: |",
        ]
        for p in points:
            load = p["load"]
            lines.append(
                f"| {p['server']} | {p['connections']} | {load['rps']:.0f} | "
                f"{load['goodput']:.0f} | "
                + " | ".join(f"{_pct(p, q):.1f}" for q in SHOWN)
                + f" | {load['latency_ms']['max']:.0f} | {_non_2xx(p)} | {_socket_errors(p)} | "
                f"{p['calls_per_request']:.3f} | {p['server_cpu_us_per_request']:.0f} |"
            )
        lines += ["", "Measured minus ideal (ms) and smart / naive ratios:", ""]
        lines += [
            "| conns | smart -ideal p50 | p90 | p99 | naive -ideal p50 | p99 | "
            "200/s smart/naive | CPU/req smart/naive |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in _points(results, scenario=mode, server="smart"):
            naive = _points(results, scenario=mode, server="naive", connections=s["connections"])
            n = naive[0] if naive else None
            d = [f"{_pct(s, q) - ref['p' + q]:+.1f}" for q in ("50", "90", "99")]
            nd = [f"{_pct(n, q) - ref['p' + q]:+.1f}" for q in ("50", "99")] if n else ["", ""]
            good = (
                f"{s['load']['goodput'] / n['load']['goodput']:.2f}"
                if n and n["load"]["goodput"]
                else "-"
            )
            cpu = (
                f"{s['server_cpu_us_per_request'] / n['server_cpu_us_per_request']:.2f}"
                if n and n["server_cpu_us_per_request"]
                else "-"
            )
            lines.append(f"| {s['connections']} | " + " | ".join([*d, *nd, good, cpu]) + " |")
        lines += [
            "",
            "Resources of all gunicorn processes, before / peak / after / after 4 s idle:",
            "",
            "| server | conns | RSS MiB | fds | upstream connections | simulator CPU µs/req | "
            "wrk CPU µs/req |",
            "| --- | ---: | --- | --- | --- | ---: | ---: |",
        ]
        for p in points:
            lines.append(
                f"| {p['server']} | {p['connections']} | {_trio(p, 'rss_mib')} | "
                f"{_trio(p, 'fds')} | {_trio(p, 'upstream_connections')} | "
                f"{p['simulator_cpu_us_per_request']:.0f} | {p['wrk_cpu_us_per_request']:.0f} |"
            )
        lines.append("")
    lines += _overload(
        results, "fixed", "the in-flight limit following loop lag (the default, 10 ms)"
    )
    lines += _overload(results, "cap", "a fixed in-flight cap (`SMART_LOOP_LAG_TARGET_MS=0`)")
    unhedged = _points(results, scenario="unhedged")
    if unhedged:
        lines += [
            "## Does hedging pay? Random mode, the same load with hedging off and on",
            "",
            "| conns | | p50 | p90 | p99 | p99.9 | error rate | calls/req |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for u in unhedged:
            c = u["connections"]
            hedged = _points(results, scenario="random", server="smart", connections=c)
            rows = [("smart, hedging off", u)] + (
                [("smart, hedging on", hedged[0])] if hedged else []
            )
            for label, p in rows:
                lines.append(
                    f"| {c} | {label} | "
                    + " | ".join(f"{_pct(p, q):.0f}" for q in SHOWN)
                    + f" | {_error_rate(p):.2%} | {p['calls_per_request']:.2f} |"
                )
            for label, key in (("ideal, off", "random_unhedged"), ("ideal, on", "random")):
                ref = ideal[key]
                lines.append(
                    f"| {c} | {label} | "
                    + " | ".join(f"{ref['p' + q]:.0f}" for q in SHOWN)
                    + f" | {ref['error_rate']:.2%} | {ref['calls_per_request']:.2f} |"
                )
        lines.append("")
    capacity = _points(results, scenario="capacity")
    if capacity:
        p = capacity[0]
        r = p["resources"]
        in_flight = max(1, r["peak"]["upstream_in_flight"])
        lines += [
            "## Capacity: every upstream call takes 5 s",
            "",
            f"{p['connections']} connections for {p['load']['duration_s']:.0f} s. "
            f"Answers: {p['load']['statuses']}; socket errors: {_socket_errors(p)}. "
            f"Peak upstream calls in flight: {r['peak']['upstream_in_flight']}; "
            f"peak upstream connections {r['peak']['upstream_connections']}; "
            f"RSS {r['before']['rss_mib']} → {r['peak']['rss_mib']} MiB, "
            f"fds {r['before']['fds']} → {r['peak']['fds']}: per upstream call in flight "
            f"{(r['peak']['rss_mib'] - r['before']['rss_mib']) * 1024 / in_flight:.1f} KiB "
            f"and {(r['peak']['fds'] - r['before']['fds']) / in_flight:.2f} fds.",
            "",
        ]
    return "\n".join(lines)


def _overload(results: dict[str, Any], scenario: str, limit: str) -> list[str]:
    """smart's fixed-mode points of ``scenario`` as an overload curve, against its goodput
    at 200 connections in the same run."""
    points = _points(results, scenario=scenario, server="smart")
    peak = next((p for p in points if p["connections"] == OVERLOAD_REFERENCE), None)
    if not points or peak is None or not peak["load"]["goodput"]:
        return []
    lines = [
        f"## Overload: smart with {limit}, fixed 100 ms, closed-loop connections",
        "",
        f"Goodput relative to the {OVERLOAD_REFERENCE} connections point; 503s are the "
        "in-flight limit's refusals; p99 is what wrk saw, waits in the kernel's accept "
        "queue included; *admitted* is the server's own time of the 200s (Server-Timing), "
        "against the ideal 100 ms; calls per 200 are upstream calls per successful answer.",
        "",
        f"| conns | 200/s | of the {OVERLOAD_REFERENCE}-conn point | 503/s | p99 | "
        "admitted p50 / p99 | socket errors | calls per 200 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for p in points:
        load = p["load"]
        seconds = load["duration_s"] or 1
        ok = load["statuses"].get("200", 0)
        refused = load["statuses"].get("503", 0)
        # calls/req is over the requests that reached the upstream: all but the 503s.
        upstream_requests = load["requests"] - refused
        calls_per_200 = p["calls_per_request"] * upstream_requests / ok if ok else 0.0
        lines.append(
            f"| {p['connections']} | {load['goodput']:.0f} | "
            f"{load['goodput'] / peak['load']['goodput']:.0%} | {refused / seconds:.0f} | "
            f"{_pct(p, '99'):.0f} | {_served(p)} | {_socket_errors(p)} | {calls_per_200:.3f} |"
        )
    return [*lines, ""]


def _served(point: dict[str, Any]) -> str:
    served = point["load"].get("served_percentiles_ms") or {}
    if served.get("50") is None:
        return "n/a"
    return f"{served['50']:.0f} / {served['99']:.0f}"


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from bench import ideal as ideal_model  # noqa: PLC0415

    # Latency CDF, measured vs ideal, per mode at the lowest and a mid concurrency.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fixed", "random"), strict=True):
        model = ideal_model.fixed() if mode == "fixed" else ideal_model.hedged()
        qs = (
            [float(q) for q in _points(results, scenario=mode)[0]["load"]["percentiles_ms"]]
            if _points(results, scenario=mode)
            else []
        )
        if qs:
            ax.plot([model.percentile(q) for q in qs], [q / 100 for q in qs], "k--", label="ideal")
        for p in _points(results, scenario=mode):
            if p["connections"] not in (10, 50, 500):
                continue
            pct = p["load"]["percentiles_ms"]
            xs = [pct[k] for k in pct]
            ys = [float(k) / 100 for k in pct]
            ax.plot(
                xs,
                ys,
                label=f"{p['server']} c={p['connections']}",
                linestyle="-" if p["server"] == "smart" else ":",
            )
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{mode} mode: latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ("fixed", "random"):
        for server, style in (("smart", "-o"), ("naive", ":s")):
            pts = _points(results, scenario=mode, server=server)
            if not pts:
                continue
            cs = [p["connections"] for p in pts]
            left.plot(cs, [p["load"]["goodput"] for p in pts], style, label=f"{server} {mode}")
            right.plot(cs, [_pct(p, "99") for p in pts], style, label=f"{server} {mode}")
    left.set_title("goodput (200/s) vs connections")
    right.set_title("p99 latency (ms) vs connections")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("connections")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "throughput_p99.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in ("fixed", "random"):
        for server, style in (("smart", "-o"), ("naive", ":s")):
            pts = _points(results, scenario=mode, server=server)
            if pts:
                ax.plot(
                    [p["connections"] for p in pts],
                    [p["calls_per_request"] for p in pts],
                    style,
                    label=f"{server} {mode}",
                )
        ax.axhline(
            results["ideal"][mode]["calls_per_request"], color="grey", linestyle="--", linewidth=0.8
        )
    ax.set_xscale("log")
    ax.set_xlabel("connections")
    ax.set_ylabel("upstream calls per request")
    ax.set_title("upstream calls per request (dashed: ideal)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calls_per_request.png", dpi=110)
    plt.close(fig)
