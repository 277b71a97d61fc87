#!/usr/bin/env python3
"""Greedy outputs of a deployment, and how two deployments' outputs compare.

    greedy_probe.py send [--prompts 8] [--max-tokens 32] [--words 400] URL OUT.json
    greedy_probe.py compare A.json B.json NAME

`send` asks /v1/completions for the greedy continuation (temperature 0,
ignore_eos, the top two logprobs of every token) of fixed prompts of random
words, one request at a time, and saves tokens and logprobs. `compare` counts
the prompts whose tokens are equal and, at the first token where they differ,
A's margin between its top two candidates: a margin within bf16 rounding
(< 0.5 nats: the probe models' top logits are ~60, and bf16 rounding moves them by ~4e-3 of that) is a near-tie, where two correct implementations may pick
differently. It prints one JSON line and exits 1 if a divergence is not a
near-tie.
"""

import argparse
import json
import random
import sys
import urllib.request

NEAR_TIE = 0.5


def prompts(n, words):
    rng = random.Random(1234)
    vocab = ["river", "stone", "light", "garden", "window", "music", "paper", "winter",
             "forest", "ocean", "silver", "market", "bridge", "cloud", "engine", "letter"]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def send(url, out, n=8, max_tokens=32, words=400):
    results = []
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    for p in prompts(n, words):
        body = json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "logprobs": 2}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.load(r)["choices"][0]
        lp = choice.get("logprobs") or {}
        results.append({"text": choice["text"], "tokens": lp.get("tokens", []),
                        "top": lp.get("top_logprobs", [])})
    json.dump(results, open(out, "w"))
    print(f"{out}: {len(results)} prompts of {words} words, {max_tokens} tokens each")


def compare(a_path, b_path, name):
    a, b = json.load(open(a_path)), json.load(open(b_path))
    equal, tokens_equal, tokens_total, divergences = 0, 0, 0, []
    for i, (x, y) in enumerate(zip(a, b)):
        n = len(x["tokens"])
        tokens_total += n
        first = next((t for t in range(n) if t >= len(y["tokens"]) or x["tokens"][t] != y["tokens"][t]), None)
        if first is None and len(y["tokens"]) == n:
            equal += 1
            tokens_equal += n
            continue
        tokens_equal += first if first is not None else n
        top = sorted((x["top"][first] or {}).values(), reverse=True) if first is not None and first < len(x["top"]) else []
        margin = top[0] - top[1] if len(top) >= 2 else None
        divergences.append({"prompt": i, "token": first, "margin": margin})
    bad = [d for d in divergences if d["margin"] is None or d["margin"] >= NEAR_TIE]
    summary = {"check": name, "prompts": len(a), "prompts_equal": equal,
               "tokens_equal_before_divergence": tokens_equal, "tokens": tokens_total,
               "divergences": divergences, "near_ties_only": not bad}
    print(json.dumps(summary))
    return 0 if not bad else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--words", type=int, default=400)
    s.add_argument("url")
    s.add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("name")
    args = ap.parse_args()
    if args.cmd == "send":
        send(args.url, args.out, args.prompts, args.max_tokens, args.words)
        return 0
    return compare(args.a, args.b, args.name)


if __name__ == "__main__":
    sys.exit(main())
