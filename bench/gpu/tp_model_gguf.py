#!/usr/bin/env python3
"""Writes a small llama-shaped GGUF with random weights that tensor parallelism
can split: the default model's tokenizer and chat template (every metadata key
of SRC) with 4 layers, hidden 256, 4 query / 2 KV heads of 64, FFN 704.

The default model (9 heads / 3 KV heads) cannot be split in two, and dummy
weights differ with the group size, so comparing `tandem serve` at
--tensor-parallel-size 1 and 2 on the same weights needs a model file like
this one. Weights are Q8_0 (what the loader dequantizes is then the same on
both sides). The output head is its own (untied: a tied head would mostly
echo the current token) with a standard deviation of 1, so that logits are
spread (about 16) and greedy picks are rarely near-ties.

    python3 bench/gpu/tp_model_gguf.py SRC.gguf DST.gguf [--seed 1]
"""

import argparse

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 704, 4
# Scale of the attention and MLP outputs against the embedding (std 1): large
# enough that every layer moves the residual stream, so that the next token
# depends on the context and not only on the current token.
LAYER_GAIN = 2.0
SHAPE_KEYS = {
    "embedding_length": HIDDEN,
    "attention.head_count": HEADS,
    "attention.head_count_kv": KV_HEADS,
    "attention.key_length": HEAD_DIM,
    "attention.value_length": HEAD_DIM,
    "rope.dimension_count": HEAD_DIM,
    "feed_forward_length": FFN,
    "block_count": LAYERS,
}


def field_value(field):
    if field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    reader = GGUFReader(args.src)
    arch = field_value(reader.fields["general.architecture"])
    writer = GGUFWriter(args.dst, arch)
    shape = {f"{arch}.{k}": v for k, v in SHAPE_KEYS.items()}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in shape:
            continue
        kind = field.types[0]
        value = field_value(field)
        if kind == GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, kind)
    for name, v in shape.items():
        writer.add_uint32(name, v)

    rng = np.random.default_rng(args.seed)

    def q8(name, rows, cols, std):
        w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name, n):
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q8("token_embd.weight", vocab, HIDDEN, 1.0)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight", HIDDEN)
        q8(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN, HIDDEN ** -0.5)
        q8(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, HIDDEN ** -0.5)
        q8(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, HIDDEN ** -0.5)
        q8(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM, LAYER_GAIN * (HEADS * HEAD_DIM) ** -0.5)
        norm(f"blk.{i}.ffn_norm.weight", HIDDEN)
        q8(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, HIDDEN ** -0.5)
        q8(f"blk.{i}.ffn_up.weight", FFN, HIDDEN, HIDDEN ** -0.5)
        q8(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, LAYER_GAIN * FFN ** -0.5)
    norm("output_norm.weight", HIDDEN)
    q8("output.weight", vocab, HIDDEN, 1.0)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
