#!/usr/bin/env python3
"""Disaggregated vs aggregated on this machine (CPU), default model.

Two measurements, each with `tandem bench` against real processes on loopback:

  1. TTFT at light load (one request at a time): `tandem serve` vs a 1 prefill +
     1 decode deployment (`tandem frontend` + `tandem prefill` + `tandem decode`,
     default `--remote-prefill-min-tokens`), for several prompt lengths.
  2. The remote-prefill overhead behind `--remote-prefill-min-tokens`'s default:
     the same 1P+1D deployment forced to prefill every prompt remotely
     (threshold 1) vs locally (threshold above every prompt), TTFT by prompt
     length. Remote prefill costs a gRPC round trip plus shipping 46 KB of KV
     per token; what it buys is a decode worker whose running streams are not
     stalled by long prompt computations.

Results go to docs/benchmarks.md between markers, with machine, commit, command.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MARK_BEGIN = "<!-- disagg-bench:begin -->"
MARK_END = "<!-- disagg-bench:end -->"
MAX_MODEL_LEN = 4096


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"a tandem process exited early with {p.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit(f"port {port} did not become healthy")


class Deployment:
    def __init__(self, tandem, kind, threshold=None):
        self.procs = []
        log = open(os.devnull, "w")
        common = ["--max-model-len", str(MAX_MODEL_LEN)]
        if kind == "serve":
            self.port = free_port()
            self.procs.append(subprocess.Popen(
                [tandem, "serve", "--port", str(self.port)] + common, stderr=log))
            wait_healthy(self.port, self.procs)
            return
        pp, pg, dp, dg, self.port = (free_port() for _ in range(5))
        self.procs.append(subprocess.Popen(
            [tandem, "prefill", "--port", str(pp), "--grpc-port", str(pg)] + common, stderr=log))
        decode = [tandem, "decode", "--port", str(dp), "--grpc-port", str(dg),
                  "--prefill-workers", f"127.0.0.1:{pg}"] + common
        if threshold is not None:
            decode += ["--remote-prefill-min-tokens", str(threshold)]
        self.procs.append(subprocess.Popen(decode, stderr=log))
        self.procs.append(subprocess.Popen(
            [tandem, "frontend", "--port", str(self.port),
             "--decode-workers", f"127.0.0.1:{dg}"] + common, stderr=log))
        wait_healthy(pp, self.procs)
        wait_healthy(dp, self.procs)
        wait_healthy(self.port, self.procs)
        time.sleep(0.5)

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def bench(tandem, port, input_len, output_len, requests, seed):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [tandem, "bench", "--url", f"http://127.0.0.1:{port}", "--concurrency", "1",
             "--input-len", str(input_len), "--output-len", str(output_len),
             "--num-requests", str(requests), "--seed", str(seed), "--json", out.name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.load(open(out.name))
    if report["errors"]:
        sys.exit(f"bench errors: {report['error_samples']}")
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args()
    tandem = os.path.abspath(args.tandem)
    seed = 1000

    lengths = [128, 512, 1024]
    light = {}
    for kind in ["serve", "disagg"]:
        d = Deployment(tandem, kind)
        try:
            for n in lengths:
                seed += 1
                r = bench(tandem, d.port, n, 16, args.requests, seed)
                light[(kind, n)] = r
                print(f"{kind:7} input {n:5}: TTFT p50 {r['ttft']['p50_ms']:.0f} ms, "
                      f"ITL p50 {r['itl']['p50_ms']:.1f} ms", flush=True)
        finally:
            d.close()

    overhead_lengths = [32, 128, 256, 512, 1024]
    forced = {}
    for mode, threshold in [("local", 1_000_000), ("remote", 1)]:
        d = Deployment(tandem, "disagg", threshold)
        try:
            for n in overhead_lengths:
                seed += 1
                r = bench(tandem, d.port, n, 4, args.requests, seed)
                forced[(mode, n)] = r["ttft"]["p50_ms"]
                print(f"forced {mode:6} input {n:5}: TTFT p50 {forced[(mode, n)]:.0f} ms", flush=True)
        finally:
            d.close()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    lines = [
        MARK_BEGIN,
        f"Machine: {cpu}, {os.cpu_count()} cores; load average at the end {load:.1f}. "
        f"Commit `{commit}`. Command: `make bench` (`python3 bench/disagg_bench.py`). "
        f"One request at a time, {args.requests} requests per cell, 16 output tokens "
        "(4 for the threshold table), greedy; prompts unique per request (no prefix-cache hits).",
        "",
        "**TTFT at light load, aggregated vs 1 prefill + 1 decode** (default model, CPU):",
        "",
        "| prompt tokens | serve TTFT p50 | 1P+1D TTFT p50 | serve ITL p50 | 1P+1D ITL p50 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        s, g = light[("serve", n)], light[("disagg", n)]
        lines.append(f"| {n} | {s['ttft']['p50_ms']:.0f} ms | {g['ttft']['p50_ms']:.0f} ms | "
                     f"{s['itl']['p50_ms']:.1f} ms | {g['itl']['p50_ms']:.1f} ms |")
    lines += [
        "",
        "**Remote vs local prefill on the decode worker** (1P+1D, threshold forced to 1 or "
        "above every prompt; the difference is the price of remote prefill):",
        "",
        "| prompt tokens | local TTFT p50 | remote TTFT p50 | remote overhead |",
        "|---:|---:|---:|---:|",
    ]
    for n in overhead_lengths:
        lo, re_ = forced[("local", n)], forced[("remote", n)]
        lines.append(f"| {n} | {lo:.0f} ms | {re_:.0f} ms | {re_ - lo:+.0f} ms ({(re_ / lo - 1) * 100:+.0f}%) |")
    lines.append(MARK_END)
    block = "\n".join(lines)
    print(block)
    path = Path(args.out)
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## Disaggregated vs aggregated (CPU)\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
