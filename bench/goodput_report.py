#!/usr/bin/env python3
"""Turns what bench/gpu/goodput.sh measured into tables and a plot.

    python3 bench/goodput_report.py RESULTS_DIR [--png docs/img/goodput.png]
        [--out docs/benchmarks.md] [--warmup 1.5] [--ttft-mult 4] [--itl-mult 1.5]

RESULTS_DIR holds the unpacked `results/` of goodput.tar.gz: one `tandem
bench` JSON per run (`run-<config>-<input>-<output>-<rate>.json`, every
request listed), the light-load calibration (`calib-<input>-<output>.json`),
the workers' /metrics after each run and `params.json`.

SLOs, per workload: TTFT <= ttft-mult x the light-load TTFT and mean ITL
(time per output token after the first) <= itl-mult x the light-load mean
ITL, both measured one request at a time on the aggregated deployment (the
best the hardware does for a lone request through the whole stack).

A request meets the SLO when it finished, its TTFT and its mean ITL are
within bounds. Requests sent in the first `warmup` seconds of a run are left
out (the system starts empty). Per run: attainment (share of requests
meeting the SLO), goodput (those per second of the measured window), TTFT
and ITL percentiles, output tokens/s per GPU. Per configuration: goodput =
the highest offered rate at which at least 90% of requests meet the SLO
(DistServe's definition), interpolated linearly between measured rates.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

CONFIGS = [
    ("agg", "aggregated (2 × serve)"),
    ("ipc", "disaggregated 1P+1D, cuda-ipc"),
    ("grpc", "disaggregated 1P+1D, gRPC"),
    ("ipcpure", "disaggregated 1P+1D, cuda-ipc, never prefilling on the decode GPU"),
]
ATTAINMENT = 0.90
# The plot's title; params.json's "title" replaces it.
TITLE = ["Goodput on two GPUs"]


def percentile(values, q):
    """Linear interpolation between ranks (numpy's default); inf-aware."""
    if not values:
        return None
    v = sorted(values)
    rank = q * (len(v) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    if math.isinf(v[hi]):
        return math.inf
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def mean_itl(rec):
    gaps = rec["itl_ms"]
    return sum(gaps) / len(gaps) if gaps else None


def load(path):
    with open(path) as f:
        return json.load(f)


class Slo:
    def __init__(self, ttft_ms, itl_ms):
        self.ttft_ms, self.itl_ms = ttft_ms, itl_ms

    def met(self, rec):
        if rec["error"] is not None or rec["ttft_ms"] is None:
            return False
        itl = mean_itl(rec)
        return rec["ttft_ms"] <= self.ttft_ms and (itl is None or itl <= self.itl_ms)


def calibration(results, wl):
    """Light-load TTFT and mean ITL (medians, the first request left out as
    a warm-up)."""
    path = os.path.join(results, f"calib-{wl[0]}-{wl[1]}.json")
    recs = [r for r in load(path)["records"] if r["error"] is None]
    recs = recs[1:] if len(recs) > 2 else recs
    return (statistics.median(r["ttft_ms"] for r in recs),
            statistics.median(mean_itl(r) for r in recs))


def run_stats(report, params, warmup_s, slo, out_tokens, repeats=0):
    # A request sent late in the run that would meet the SLO may still be
    # streaming when the drain period cuts it off: leave out those sent less
    # than its longest SLO-meeting duration before the cut, so every cut-off
    # request in the window is a true miss.
    longest_ok_s = (slo.ttft_ms + (out_tokens - 1) * slo.itl_ms) / 1e3
    end_s = min(params["duration_s"], params["duration_s"] + params["drain_s"] - longest_ok_s)
    # The first `repeats` requests repeated prompts an earlier run had sent
    # to the same deployment (prefix-cache hits): the window starts after them.
    start_s = warmup_s
    if repeats:
        start_s = max(start_s, report["records"][min(repeats, len(report["records"])) - 1]["sent_ms"] / 1e3)
    window_s = end_s - start_s
    recs = [r for r in report["records"][repeats:] if start_s * 1e3 <= r["sent_ms"] < end_s * 1e3]
    ok = [r for r in recs if r["error"] is None]
    met = sum(1 for r in recs if slo.met(r))
    # A request cut off before its first token waited at least that long: inf.
    ttfts = [r["ttft_ms"] if r["ttft_ms"] is not None else math.inf for r in recs]
    req_itls = [mean_itl(r) if r["error"] is None else math.inf for r in recs
                if r["error"] is not None or mean_itl(r) is not None]
    gaps = [g for r in ok for g in r["itl_ms"]]
    return {
        "requests": len(recs),
        "cut_off": sum(1 for r in recs if r["error"] is not None),
        "attainment": met / len(recs) if recs else 0.0,
        "goodput": met / window_s,
        "achieved": len(ok) / window_s,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p90": percentile(ttfts, 0.9),
        "ttft_p99": percentile(ttfts, 0.99),
        "req_itl_p90": percentile(req_itls, 0.9),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p90": percentile(gaps, 0.9),
        "itl_p99": percentile(gaps, 0.99),
        "tok_s_gpu": sum(r["output_tokens"] for r in ok) / window_s / params["gpus"],
    }


def config_goodput(points):
    """Highest rate with attainment >= 90%, interpolated; (value, bounded)
    where bounded is False when even the highest measured rate passed."""
    points = sorted(points)
    best = 0.0
    for i, (rate, att) in enumerate(points):
        if att >= ATTAINMENT:
            best = rate
            continue
        if i > 0 and points[i - 1][1] >= ATTAINMENT:
            r0, a0 = points[i - 1]
            best = r0 + (rate - r0) * (a0 - ATTAINMENT) / (a0 - att)
        return best, True
    return best, False


def prom_value(path, metric, labels):
    """Sum of a counter's samples whose labels include all of `labels`."""
    total = 0.0
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            if line.startswith(metric) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def prom_delta(results, tag, process, metric, labels):
    """A counter's growth over one run (scraped before and after it)."""
    pre, post = (prom_value(os.path.join(results, f"{tag}-{when}-{process}.prom"), metric, labels)
                 for when in ("pre", "post"))
    return None if pre is None or post is None else post - pre


def run_files(results, params):
    """{(config, workload): [(rate, rate text, report, repeats)]}, rates ascending.

    Runs of one deployment go up in rate. Before `seed_per_run` (params),
    every run used the same seed, so its first requests resent the prompts of
    the runs before it: `repeats` of them, prefix-cache hits to leave out."""
    found = {}
    for path in glob.glob(os.path.join(results, "run-*.json")):
        m = re.match(r"run-(\w+)-(\d+)-(\d+)-([\d.]+)\.json", os.path.basename(path))
        key = (m.group(1), (int(m.group(2)), int(m.group(3))))
        found.setdefault(key, []).append((float(m.group(4)), m.group(4), load(path)))
    out = {}
    for key, runs in found.items():
        runs.sort(key=lambda r: r[0])
        sent_before = 0
        out[key] = []
        for rate, text, report in runs:
            repeats = 0 if params.get("seed_per_run") else sent_before
            out[key].append((rate, text, report, repeats))
            sent_before = max(sent_before, len(report["records"]))
    return out


def collect(results, params, warmup_s, slos):
    runs = {}
    for (config, wl), files in run_files(results, params).items():
        for rate, text, report, repeats in files:
            stats = run_stats(report, params, warmup_s, slos[wl], wl[1], repeats)
            stats["repeats"] = repeats
            tag = f"{config}-{wl[0]}-{wl[1]}-{text}"

            def delta(process, metric, labels=None):
                return prom_delta(results, tag, process, metric, labels or {})

            for where in ("remote", "local"):
                stats[where] = delta("decode-0", "tandem_worker_prefills_total",
                                     {"location": where})
            stats["prompt_tokens"] = delta("frontend-0", "tandem_frontend_input_tokens_sum")
            stats["prompts"] = delta("frontend-0", "tandem_frontend_input_tokens_count")
            stats["preemptions"] = sum(
                delta(worker, "tandem_worker_preemptions_total") or 0
                for worker in ("decode-0", "decode-1", "prefill-0"))
            runs.setdefault((config, wl), []).append((rate, stats))
    return runs


def fmt(v, digits=0):
    if v is None:
        return "—"
    if math.isinf(v):
        return "cut off"
    return f"{v:.{digits}f}"


def markdown(results, params, warmup_s, workloads, calib, slos, runs, args):
    names = dict(CONFIGS)
    out = []
    machine = open(os.path.join(results, "machine.txt")).read().strip().splitlines()
    cards = [line.split(", ")[1] for line in machine if re.match(r"^\d+, ", line)]
    card = f"{cards[0]} × {len(cards)}" if cards else "no GPU (nvidia-smi absent)"
    out.append(f"Card: {card}. Model: `--load-format dummy --dummy-shape "
               f"{params['shape']}`, engine flags `{params['engine_args']}` on every worker. "
               f"Runs: {params['duration_s']} s of Poisson arrivals each, then {params['drain_s']} s "
               "to drain before what still streams is cut off. Measured: requests sent after the "
               f"first {warmup_s:g} s and early enough that one meeting the SLO ends before the "
               "cut (so a cut-off request is a true miss).")
    out.append("")
    out.append("**SLOs** (light load = one request at a time, aggregated, median; prompt "
               "tokens as the frontend counted them over every run):")
    out.append("")
    out.append("| workload (in/out tokens) | prompt tokens (mean) | light-load TTFT | "
               f"light-load mean ITL | TTFT SLO ({args.ttft_mult:g}×) | "
               f"ITL SLO ({args.itl_mult:g}×) |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for wl in workloads:
        t, i = calib[wl]
        stats = [s for (c, w), pts in runs.items() if w == wl for _, s in pts]
        n = sum(s["prompts"] or 0 for s in stats)
        mean_prompt = sum(s["prompt_tokens"] or 0 for s in stats) / n if n else None
        out.append(f"| {wl[0]}/{wl[1]} | {fmt(mean_prompt)} | {t:.1f} ms | {i:.2f} ms | "
                   f"{slos[wl].ttft_ms:.0f} ms | {slos[wl].itl_ms:.1f} ms |")
    preempted = sum(s["preemptions"] for pts in runs.values() for _, s in pts)
    out.append("")
    out.append(f"Preemptions (KV blocks ran out) over all runs: {preempted:.0f}.")
    out.append("")
    out.append("**Goodput** (highest rate with ≥ 90% of requests within both SLOs):")
    out.append("")
    header = "| configuration | " + " | ".join(f"{a}/{b}" for a, b in workloads) + " |"
    out.append(header)
    out.append("|---|" + "---:|" * len(workloads))
    goodputs = {}
    for config, label in CONFIGS:
        if not any((config, wl) in runs for wl in workloads):
            continue
        cells = []
        for wl in workloads:
            pts = [(r, s["attainment"]) for r, s in runs.get((config, wl), [])]
            if not pts:
                cells.append("not run")
                continue
            g, bounded = config_goodput(pts)
            goodputs[(config, wl)] = g
            if g == 0:
                cells.append(f"< {min(pts)[0]:g} req/s (the lowest rate missed)")
            else:
                cells.append(f"{g:.2f} req/s" + ("" if bounded else " (≥: every rate passed)"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for wl in workloads:
        a, d = goodputs.get(("agg", wl)), goodputs.get(("ipc", wl))
        if a and d is not None:
            out.append("")
            out.append(f"Disaggregated (cuda-ipc) / aggregated on {wl[0]}/{wl[1]}: "
                       f"**{d / a:.2f}×**.")
    out.append("")
    out.append("**Per run** (TTFT and ITL in ms; req ITL = per-request mean ITL; "
               "remote/local = prompts the decode worker sent to the prefill worker or "
               "prefilled itself, whole run; tok/s per GPU = output tokens of the measured "
               "requests; \"after N repeats\": the run's first N prompts repeated an earlier "
               "run's at the same deployment, hit its prefix cache and are left out, with the "
               "time they were sent in):")
    out.append("")
    out.append("| config | in/out | rate | requests | within SLO | goodput | TTFT p50 | TTFT p90 | "
               "TTFT p99 | req ITL p90 | ITL p50 | ITL p90 | ITL p99 | tok/s/GPU | remote/local |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for config, _ in CONFIGS:
        for wl in workloads:
            for rate, s in runs.get((config, wl), []):
                rl = "—"
                if s["remote"] is not None and config != "agg":
                    rl = f"{s['remote']:.0f}/{s['local']:.0f}"
                cut = f" ({s['cut_off']} cut off)" if s["cut_off"] else ""
                if s["repeats"]:
                    cut += f", after {s['repeats']} repeats"
                out.append(
                    f"| {config} | {wl[0]}/{wl[1]} | {rate:g} | {s['requests']}{cut} | "
                    f"{100 * s['attainment']:.0f}% | {s['goodput']:.2f} | {fmt(s['ttft_p50'])} | "
                    f"{fmt(s['ttft_p90'])} | {fmt(s['ttft_p99'])} | {fmt(s['req_itl_p90'], 1)} | "
                    f"{fmt(s['itl_p50'], 1)} | {fmt(s['itl_p90'], 1)} | {fmt(s['itl_p99'], 1)} | "
                    f"{s['tok_s_gpu']:.0f} | {rl} |")
    out.append("")
    files = run_files(results, params)
    names = dict(CONFIGS)
    for disagg in ("ipc", "ipcpure"):
        wls = [wl for wl in workloads if ("agg", wl) in files and (disagg, wl) in files]
        if not wls:
            continue
        out.append(f"**Sensitivity**: goodput of {names[disagg]} / aggregated for other SLO "
                   "multiples (rows: ITL ×, columns: TTFT ×; in brackets the two goodputs in "
                   "req/s, \"<r\" where even the lowest rate r missed, \"≥g\" where every rate passed):")
        out.append("")
        for wl in wls:
            t, i = calib[wl]
            tm = [2, 4, 8]
            out.append(f"| {wl[0]}/{wl[1]} | " + " | ".join(f"TTFT {m}×" for m in tm) + " |")
            out.append("|---|" + "---:|" * len(tm))
            for im in [1.25, 1.5, 2, 3]:
                cells = []
                for m in tm:
                    slo = Slo(m * t, im * i)
                    g = {}
                    for config in ("agg", disagg):
                        pts = [(rate, run_stats(report, params, warmup_s, slo, wl[1],
                                                repeats)["attainment"])
                               for rate, _, report, repeats in files[(config, wl)]]
                        value, bounded = config_goodput(pts)
                        text = f"{value:.1f}" if value else f"<{min(pts)[0]:g}"
                        g[config] = (value, bounded, text if bounded or not value else "≥" + text)
                    (ga, ba, ta), (gd, bd, td) = g["agg"], g[disagg]
                    # A goodput with every measured rate passing is only a lower bound.
                    ratio = "—"
                    if ga and gd and (ba or bd):
                        ratio = ("" if ba and bd else "≥" if ba else "≤") + f"{gd / ga:.2f}×"
                    cells.append(f"{ratio} ({td}/{ta})")
                out.append(f"| ITL {im:g}× | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n", goodputs


def plot(png, workloads, slos, runs, goodputs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, len(workloads), figsize=(6 * len(workloads), 11), squeeze=False)
    colors = {"agg": "tab:blue", "ipc": "tab:red", "grpc": "tab:green", "ipcpure": "tab:purple"}
    for col, wl in enumerate(workloads):
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        max_rate = 0.0
        for config, label in CONFIGS:
            pts = runs.get((config, wl), [])
            if not pts:
                continue
            rates = [r for r, _ in pts]
            max_rate = max(max_rate, max(rates))
            c = colors[config]
            top.plot(rates, [s["goodput"] for _, s in pts], "o-", color=c, label=label)
            if (config, wl) in goodputs:
                top.axvline(goodputs[(config, wl)], color=c, ls=":", lw=1)
            finite = lambda v: v if v is not None and not math.isinf(v) else float("nan")
            mid.plot(rates, [finite(s["ttft_p90"]) for _, s in pts], "o-", color=c, label=label)
            bottom.plot(rates, [finite(s["req_itl_p90"]) for _, s in pts], "o-", color=c,
                        label=label)
        top.plot([0, max_rate], [0, max_rate], color="grey", lw=0.8, ls="--",
                 label="every request within SLO")
        top.set_title(f"input {wl[0]} / output {wl[1]} tokens")
        top.set_ylabel("goodput (req/s within SLO)")
        mid.axhline(slos[wl].ttft_ms, color="black", ls="--", lw=1, label="SLO")
        mid.set_yscale("log")
        mid.set_ylabel("TTFT p90 (ms)")
        bottom.axhline(slos[wl].itl_ms, color="black", ls="--", lw=1, label="SLO")
        bottom.set_ylabel("per-request mean ITL p90 (ms)")
        bottom.set_xlabel("offered rate (req/s, Poisson)")
        for ax in (top, mid, bottom):
            ax.grid(alpha=0.3)
            ax.set_xlim(left=0)
        top.legend(fontsize=8)
        mid.legend(fontsize=8)
    fig.suptitle(f"{TITLE[0]}: dotted lines = goodput at 90% SLO attainment")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--png")
    ap.add_argument("--out", help="replace the goodput section of this markdown file")
    ap.add_argument("--section", default="goodput",
                    help="the section between <!-- SECTION:begin --> and <!-- SECTION:end -->")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--ttft-mult", type=float, default=4.0)
    ap.add_argument("--itl-mult", type=float, default=1.5)
    args = ap.parse_args()
    params = load(os.path.join(args.results, "params.json"))
    # Deployments of other GPU counts (bench/gpu/tp.sh) name their own.
    labels = params.get("labels") or {}
    CONFIGS[:] = [(c, labels.get(c, label)) for c, label in CONFIGS]
    TITLE[0] = params.get("title", TITLE[0])
    workloads = sorted({tuple(int(x) for x in re.match(r"calib-(\d+)-(\d+)", os.path.basename(p)).groups())
                        for p in glob.glob(os.path.join(args.results, "calib-*.json"))},
                       reverse=True)
    if not workloads:
        sys.exit(f"no calib-*.json in {args.results}")
    calib = {wl: calibration(args.results, wl) for wl in workloads}
    slos = {wl: Slo(args.ttft_mult * t, args.itl_mult * i) for wl, (t, i) in calib.items()}
    runs = collect(args.results, params, args.warmup, slos)
    text, goodputs = markdown(args.results, params, args.warmup, workloads, calib, slos, runs, args)
    print(text)
    if args.png:
        os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
        plot(args.png, workloads, slos, runs, goodputs)
        print(f"plot: {args.png}")
    if args.out:
        BEGIN, END = f"<!-- {args.section}:begin -->", f"<!-- {args.section}:end -->"
        doc = open(args.out).read()
        if BEGIN not in doc or END not in doc:
            sys.exit(f"{args.out} has no {BEGIN} ... {END} section")
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(args.out, "w") as f:
            f.write(head + BEGIN + "\n" + text + END + tail)
        print(f"updated {args.out}")


if __name__ == "__main__":
    main()
