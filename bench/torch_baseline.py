#!/usr/bin/env python3
"""The PyTorch peer of `tandem gpu bench`: PyTorch + transformers on the same GPU, same shapes.

For each model shape named on the command line (default: smollm2-135m, then llama3-8b) this
builds a `LlamaForCausalLM` from a config alone (no checkpoint: random bf16 weights drawn with
the config's initializer, seeded), then measures, on one CUDA GPU:

* **compiled decode** (the number the GPU tables compare with): batch 1, greedy tokens picked
  on the GPU and fed back, a `StaticCache`, one decode step wrapped in
  `torch.compile(mode="reduce-overhead")` (CUDA graphs). A 128-token prompt is prefilled
  first, then 8 warm-up steps (compilation and graph capture happen there), then 64 timed
  steps, back to back.
* **eager decode**: the same loop without compilation, on transformers' default dynamic
  cache (a reference point for how much compilation buys).
* **prefill**: one sequence of 1024 and of 4096 tokens in one forward pass (eager, the
  default SDPA attention, logits only for the last position): 2 warm-up forwards, then 5
  timed back to back; plus MFU computed as `tandem gpu bench` computes it: (2 x parameters x
  tokens + causal attention FLOPs) / time / 790 TFLOP/s (the cuBLAS bf16 peak measured on an
  H100).

Timing: CUDA events recorded between consecutive steps (or forwards) on the GPU's stream,
with no host synchronisation inside the timed loop, so a step's time includes whatever the
host adds when the GPU waits for it. `*_ms` is the mean over the timed steps (the whole span
divided by their number: the figure the PyTorch columns of docs/benchmarks.md report);
`*_median_ms` is the median step, next to it.

Output, for `bench/gpu/run.sh` (which keeps the lines of stdout that start with `{`): one JSON
object per shape on stdout, with the keys

    shape, params_B, torch, transformers, gpu, attn_implementation,
    eager_decode_ms, eager_decode_median_ms,
    prefill_1024_ms, prefill_1024_median_ms, prefill_1024_mfu_vs790,
    prefill_4096_ms, prefill_4096_median_ms, prefill_4096_mfu_vs790,
    compiled_decode_ms, compiled_decode_median_ms

(a measurement that raised is reported as `<name>_err` with the error's text instead), and the
list of those objects in `$OUT/hf_baseline.json` (`--json` to put it elsewhere). Progress goes
to stderr.

It needs a CUDA GPU, `torch` and `transformers`; it runs on the GPU machine, staged by
`make bench-gpu` next to the Tandem binary, so that both are measured in the same call on the
same card. Only same-call ratios mean anything: PyTorch's own numbers move by several percent
between calls on the same kind of card.

    python3 bench/torch_baseline.py                       # both shapes, every measurement
    python3 bench/torch_baseline.py llama3-8b --skip eager
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import time

# Llama-architecture shapes, the same ones `tandem gpu bench --shape` knows.
SHAPES = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}

# Dense bf16 GEMM throughput measured with cuBLAS on an H100; the same constant as the Tandem
# bench's MFU, so the two MFU figures compare.
PEAK_FLOPS = 790e12

MEASUREMENTS = ("eager", "prefill", "compiled")


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Output: one JSON object per shape on stdout and the list in $OUT/hf_baseline.json. "
        "See the module docstring (or bench/gpu/run.sh) for the keys.",
    )
    ap.add_argument("shapes", nargs="*", metavar="SHAPE",
                    help="model shapes to measure, in order (default: smollm2-135m llama3-8b; "
                         "known: %s)" % ", ".join(sorted(SHAPES)))
    ap.add_argument("--context", type=int, default=128,
                    help="prompt tokens before the decode steps (default 128)")
    ap.add_argument("--warmup-steps", type=int, default=8,
                    help="decode steps run before timing; compilation happens here (default 8)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps (default 64)")
    ap.add_argument("--prefill", default="1024,4096",
                    help="comma-separated prompt lengths for the prefill timing (default 1024,4096)")
    ap.add_argument("--prefill-reps", type=int, default=5,
                    help="timed forwards per prefill length (default 5)")
    ap.add_argument("--skip", default="",
                    help="comma-separated measurements to leave out: " + ", ".join(MEASUREMENTS))
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    ap.add_argument("--json", default=None,
                    help="where to write the list of results (default $OUT/hf_baseline.json, "
                         "or ./hf_baseline.json without $OUT)")
    args = ap.parse_args(argv)
    args.shapes = args.shapes or ["smollm2-135m", "llama3-8b"]
    for s in args.shapes:
        if s not in SHAPES:
            ap.error("unknown shape %r (known: %s)" % (s, ", ".join(sorted(SHAPES))))
    args.skip = {s for s in args.skip.split(",") if s}
    for s in args.skip:
        if s not in MEASUREMENTS:
            ap.error("unknown measurement %r in --skip (known: %s)" % (s, ", ".join(MEASUREMENTS)))
    try:
        args.prefill = [int(t) for t in args.prefill.split(",") if t]
    except ValueError:
        ap.error("--prefill takes comma-separated integers")
    if args.steps < 1 or args.prefill_reps < 1 or args.context < 1:
        ap.error("--steps, --prefill-reps and --context must be positive")
    return args


class Bench:
    """Everything that needs torch; built only once the arguments are known to be good."""

    def __init__(self, args):
        try:
            import torch
            import transformers
        except ImportError as e:
            sys.exit("torch_baseline.py needs torch and transformers (it runs on the GPU machine): %s" % e)

        self.torch = torch
        self.transformers = transformers
        self.args = args
        if not torch.cuda.is_available():
            sys.exit("torch_baseline.py: no CUDA device visible to PyTorch")
        self.dev = torch.device("cuda")

    # -- building ---------------------------------------------------------------------------

    def model(self, shape):
        """A LlamaForCausalLM of `shape` in bf16 on the GPU, its weights random (seeded)."""
        torch = self.torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(self.args.seed)
        config = LlamaConfig(**SHAPES[shape])
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with self.dev:
                # The config's initializer (normal, std 0.02; norms at 1) runs on the GPU.
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        # Built under a bf16 default dtype every parameter is bf16 already; the rotary
        # frequencies stay the f32 buffer transformers makes them.
        for p in model.parameters():
            if p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
        model.eval()
        model.requires_grad_(False)
        return model

    def tokens(self, model, n):
        return self.torch.randint(0, model.config.vocab_size, (1, n), device=self.dev)

    def static_cache(self, model, length):
        """A StaticCache for one sequence of `length` positions, whatever transformers' version
        calls its constructor's arguments."""
        from transformers import StaticCache

        wanted = {
            "config": model.config,
            "max_cache_len": length,
            "max_batch_size": 1,
            "batch_size": 1,
            "device": self.dev,
            "dtype": self.torch.bfloat16,
        }
        accepted = inspect.signature(StaticCache.__init__).parameters
        kwargs = {k: v for k, v in wanted.items() if k in accepted}
        # Versions that take both spellings of the batch size warn about the old one.
        if "max_batch_size" in kwargs and "batch_size" in kwargs:
            del kwargs["batch_size"]
        return StaticCache(**kwargs)

    def last_logit_only(self, model):
        """forward()'s keyword for computing the output head on the last position only."""
        accepted = inspect.signature(model.forward).parameters
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in accepted:
                return {name: 1}
        return {}

    # -- timing -----------------------------------------------------------------------------

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def timed(self, n, body):
        """Runs body() n times back to back with a CUDA event recorded before the first run
        and after each; returns (mean, median) ms of a run. No host synchronisation between
        runs: the stream's own timeline is measured."""
        marks = [self.event()]
        marks[0].record()
        for _ in range(n):
            body()
            marks.append(self.event())
            marks[-1].record()
        self.torch.cuda.synchronize()
        spans = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return marks[0].elapsed_time(marks[-1]) / n, statistics.median(spans)

    def prefill(self, model, n):
        torch = self.torch
        extra = self.last_logit_only(model)
        ids = self.tokens(model, n)
        with torch.inference_mode():
            for _ in range(2):
                model(ids, use_cache=False, **extra)
            torch.cuda.synchronize()
            return self.timed(self.args.prefill_reps, lambda: model(ids, use_cache=False, **extra))

    def decode_eager(self, model):
        """Greedy batch-1 decode on the default dynamic cache, no compilation."""
        torch = self.torch
        args = self.args
        with torch.inference_mode():
            out = model(self.tokens(model, args.context), use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)

            state = {"token": token, "cache": cache}

            def step():
                out = model(state["token"], past_key_values=state["cache"], use_cache=True)
                state["token"] = out.logits[:, -1:].argmax(-1)
                state["cache"] = out.past_key_values

            for _ in range(args.warmup_steps):
                step()
            torch.cuda.synchronize()
            return self.timed(args.steps, step)

    def decode_compiled(self, model):
        """Greedy batch-1 decode on a StaticCache, one step under
        torch.compile(mode="reduce-overhead"). Returns (mean, median) ms per step."""
        torch = self.torch
        args = self.args
        ctx = args.context
        cache = self.static_cache(model, ctx + args.warmup_steps + args.steps + 8)

        def forward(token, position):
            return model(token, past_key_values=cache, cache_position=position,
                         use_cache=True).logits

        step = torch.compile(forward, mode="reduce-overhead", fullgraph=False)
        with torch.inference_mode():
            logits = model(self.tokens(model, ctx), past_key_values=cache,
                           cache_position=torch.arange(ctx, device=self.dev), use_cache=True).logits
            state = {"token": logits[:, -1:].argmax(-1), "pos": ctx}

            def one():
                position = torch.tensor([state["pos"]], device=self.dev)
                state["token"] = step(state["token"], position)[:, -1:].argmax(-1)
                state["pos"] += 1

            started = time.monotonic()
            for _ in range(args.warmup_steps):
                one()
            torch.cuda.synchronize()
            log("  compiled and warmed up in %.1f s" % (time.monotonic() - started))
            return self.timed(args.steps, one)

    # -- one shape --------------------------------------------------------------------------

    def measure(self, shape):
        torch = self.torch
        log("%s: building (random bf16 weights)" % shape)
        model = self.model(shape)
        params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        row = {
            "shape": shape,
            "params_B": round(params / 1e9, 3),
            "torch": torch.__version__,
            "transformers": self.transformers.__version__,
            "gpu": torch.cuda.get_device_name(self.dev),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
        }

        def attempt(key, what):
            try:
                return what()
            except Exception as e:  # one failed measurement must not lose the others
                row[key + "_err"] = repr(e)[:300]
                log("  %s failed: %r" % (key, e))
                return None

        if "eager" not in self.args.skip:
            log("%s: eager decode" % shape)
            res = attempt("eager_decode", lambda: self.decode_eager(model))
            if res is not None:
                row["eager_decode_ms"] = round(res[0], 3)
                row["eager_decode_median_ms"] = round(res[1], 3)
        if "prefill" not in self.args.skip:
            for n in self.args.prefill:
                log("%s: prefill %d tokens" % (shape, n))
                res = attempt("prefill_%d" % n, lambda: self.prefill(model, n))
                if res is not None:
                    ms = res[0]
                    # Same FLOP count as `tandem gpu bench`: every parameter twice per token,
                    # plus QK^T and PV over the causal half of the score matrix.
                    flops = 2.0 * params * n + 2.0 * cfg.num_hidden_layers * n * n * cfg.hidden_size
                    row["prefill_%d_ms" % n] = round(ms, 2)
                    row["prefill_%d_median_ms" % n] = round(res[1], 2)
                    row["prefill_%d_mfu_vs790" % n] = round(flops / (ms * 1e-3) / PEAK_FLOPS, 3)
        if "compiled" not in self.args.skip:
            log("%s: compiled decode (static cache, reduce-overhead)" % shape)
            res = attempt("compiled_decode", lambda: self.decode_compiled(model))
            if res is not None:
                row["compiled_decode_ms"] = round(res[0], 3)
                row["compiled_decode_median_ms"] = round(res[1], 3)
        del model
        # Compiled graphs (and the CUDA graphs under them) hold this shape's model and cache.
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        return row


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = Bench(args)
    rows = []
    for shape in args.shapes:
        row = bench.measure(shape)
        print(json.dumps(row), flush=True)
        rows.append(row)
    path = args.json or os.path.join(os.environ.get("OUT", "."), "hf_baseline.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    log("wrote %s" % path)


if __name__ == "__main__":
    main()
