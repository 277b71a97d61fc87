#!/usr/bin/env python3
"""CPU benchmark: Tandem vs llama.cpp on the default model, same GGUF, same run.

Measures, for each engine on this machine:
  * single-stream decode tokens/s (128 generated tokens, greedy, EOS ignored),
  * prefill tokens/s for a 500-token prompt (time to the first token),
  * aggregate decode tokens/s with 8 concurrent streams (Tandem only: llama-cpp-python
    serves one stream at a time, so its single-stream rate is the comparison point),
  * Tandem server RSS at rest after loading the model.

Every prompt starts with a unique nonce so no prefix cache (Tandem's or llama.cpp's
prefix reuse) turns a measurement into a cache hit. Results are printed as a table and
written into docs/benchmarks.md between markers, with the machine, commit and command.
"""
import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DECODE_TOKENS = 128
PREFILL_TOKENS = 500
STREAMS = 8
REPEATS = 3
MARK_BEGIN = "<!-- cpu-bench:begin -->"
MARK_END = "<!-- cpu-bench:end -->"
LOAD_AT_START = "?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, stream=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def stream_completion(base, prompt, max_tokens):
    """Returns (t_start, [token arrival times], usage) of one streamed completion."""
    t0 = time.perf_counter()
    resp = post(f"{base}/v1/completions", {
        "model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    })
    times, usage = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices"):
            times.append(time.perf_counter())
    return t0, times, usage


def nonce_prompt(words):
    return f"[{random.getrandbits(48):012x}] " + " ".join(random.choice(WORDS) for _ in range(words))


def renonce(prompt):
    """The same prompt behind a fresh nonce: a prefix cache cannot match its first block."""
    return f"[{random.getrandbits(48):012x}]" + prompt[prompt.index("]") + 1:]


WORDS = ("the quick brown fox jumps over a lazy dog while river stones shine under "
         "autumn light and distant bells ring softly across quiet valleys").split()


def prompt_of_tokens(n, count_tokens):
    """A prompt of exactly n tokens (per count_tokens), built from random words."""
    words = n
    for _ in range(20):
        p = nonce_prompt(words)
        got = count_tokens(p)
        if got == n:
            return p
        words = max(1, words + (n - got))
    # Fall back to the closest we reached; the table reports the real count.
    return p


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_tandem(binary):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "serve", "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except Exception:
                time.sleep(0.5)
        else:
            raise SystemExit("tandem serve did not become healthy")
        time.sleep(1.0)
        rss = rss_mib(proc.pid)

        def count_tokens(p):
            r = json.load(post(f"{base}/v1/completions", {"model": "default", "prompt": p, "max_tokens": 1, "temperature": 0}))
            return r["usage"]["prompt_tokens"]

        stream_completion(base, nonce_prompt(8), 16)  # warm-up
        decode = []
        for _ in range(REPEATS):
            _, times, _ = stream_completion(base, nonce_prompt(8), DECODE_TOKENS)
            decode.append((len(times) - 1) / (times[-1] - times[0]))
        prefill, prefill_len = [], 0
        for _ in range(REPEATS):
            # Calibrating the length sends the prompt once; measure it behind a new nonce.
            p = renonce(prompt_of_tokens(PREFILL_TOKENS, count_tokens))
            t0, times, usage = stream_completion(base, p, 1)
            prefill_len = usage["prompt_tokens"]
            prefill.append(prefill_len / (times[0] - t0))
        agg = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(STREAMS) as ex:
                results = list(ex.map(lambda _: stream_completion(base, nonce_prompt(8), DECODE_TOKENS), range(STREAMS)))
            wall = time.perf_counter() - t0
            agg.append(sum(len(t) for _, t, _ in results) / wall)
        return {
            "decode_tok_s": statistics.median(decode),
            "prefill_tok_s": statistics.median(prefill),
            "prefill_prompt_tokens": prefill_len,
            "aggregate_8_tok_s": statistics.median(agg),
            "rss_at_rest_mib": rss,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench_llamacpp(gguf):
    """llama.cpp at every thread count up to the core count; its best figure per measure.

    Its OpenMP threads spin at barriers: on a machine where anything else runs, 2 threads on
    2 cores can be many times slower than 1. Taking the best count is generous to it.
    """
    runs = {n: bench_llamacpp_threads(gguf, n) for n in range(1, (os.cpu_count() or 1) + 1)}
    best = {}
    for key in ("decode_tok_s", "prefill_tok_s"):
        n = max(runs, key=lambda t: runs[t][key])
        best[key] = runs[n][key]
        best[key.replace("_tok_s", "_threads")] = n
    best["by_threads"] = runs
    return best


def bench_llamacpp_threads(gguf, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                n_ctx=2048, n_batch=512, verbose=False)

    def count_tokens(p):
        return len(llm.tokenize(p.encode(), add_bos=False))

    def run(prompt, max_tokens):
        t0 = time.perf_counter()
        times = []
        for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            times.append(time.perf_counter())
        return t0, times

    # llama-cpp-python stops at EOS; a neutral prompt and enough tokens keep it going.
    run(nonce_prompt(8), 16)
    decode = []
    for _ in range(REPEATS):
        llm.reset()
        _, times = run(nonce_prompt(8), DECODE_TOKENS)
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    prefill = []
    for _ in range(REPEATS):
        llm.reset()
        p = prompt_of_tokens(PREFILL_TOKENS, count_tokens)
        t0, times = run(p, 1)
        prefill.append(count_tokens(p) / (times[0] - t0))
    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill)}


def machine():
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--gguf", default=str(Path(os.environ.get("TANDEM_MODEL_DIR", Path.home() / ".cache/tandem/models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args()

    global LOAD_AT_START
    LOAD_AT_START = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    t = bench_tandem(args.tandem)
    l = bench_llamacpp(args.gguf)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [
        ("single-stream decode (tok/s)", t["decode_tok_s"], l["decode_tok_s"]),
        (f"prefill, {t['prefill_prompt_tokens']}-token prompt (tok/s)", t["prefill_tok_s"], l["prefill_tok_s"]),
        (f"aggregate decode, {STREAMS} streams (tok/s)", t["aggregate_8_tok_s"], None),
    ]
    lines = [
        MARK_BEGIN,
        f"Machine: {machine()}. Commit `{commit}`. Command: `make bench` "
        f"(`bench/cpu_bench.py`), {time.strftime('%Y-%m-%d')}. Median of {REPEATS} runs; "
        "greedy; 128 generated tokens; Tandem on all cores; llama.cpp = llama-cpp-python 0.3.36 "
        f"built without AMX, same GGUF, best of 1..{os.cpu_count()} threads "
        f"(decode best at {l['decode_threads']}, prefill at {l['prefill_threads']}). "
        f"Load average at start: {LOAD_AT_START}.",
        "",
        "| measure | Tandem | llama.cpp | Tandem / llama.cpp |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, tv, lv in rows:
        ratio = f"{tv / lv:.2f}×" if lv else "—"
        lines.append(f"| {name} | {tv:.1f} | {lv:.1f} | {ratio} |" if lv else f"| {name} | {tv:.1f} | — | — |")
    lines += [
        "",
        f"Targets: batch-1 decode ≥ 0.5× llama.cpp → **{t['decode_tok_s'] / l['decode_tok_s']:.2f}×**; "
        f"aggregate at {STREAMS} streams above llama.cpp single-stream "
        f"({t['aggregate_8_tok_s']:.1f} vs {l['decode_tok_s']:.1f} tok/s); "
        f"server RSS at rest < 1.5 GiB → **{t['rss_at_rest_mib']:.0f} MiB**.",
        MARK_END,
    ]
    block = "\n".join(lines)
    print(block)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if MARK_BEGIN in text:
        pre, rest = text.split(MARK_BEGIN, 1)
        post_ = rest.split(MARK_END, 1)[1]
        text = pre + block + post_
    else:
        text = text.rstrip() + "\n\n## CPU: Tandem vs llama.cpp (default model)\n\n" + block + "\n"
    out.write_text(text)
    print(json.dumps({"tandem": t, "llama_cpp": l}), file=sys.stderr)


if __name__ == "__main__":
    main()
