#!/usr/bin/env python3
"""Writes a tokenizer-only GGUF: every metadata key of a model's GGUF (tokenizer,
chat template, shape) and no tensor, a few MB instead of the model's 94 MiB.

With `--load-format dummy` a worker reads only the text side of its `--model`
file, so this is all a benchmark with random weights needs. `--vocab N` pads
the vocabulary to N tokens with plain words (` t49152`, ...): a dummy shape
with a larger vocabulary (llama3-8b: 128256) samples ids the real tokenizer
does not have, and those would decode to nothing, merging streamed chunks and
hiding inter-token gaps from the load generator.

    python3 bench/gpu/tokenizer_gguf.py SRC.gguf DST.gguf [--vocab 128256]
"""

import argparse
import sys

import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter

# Byte-level BPE spells a leading space as this character.
SPACE = "\u0120"


def field_value(field):
    """A reader field as a Python value (list for arrays)."""
    kinds = field.types
    if kinds[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--vocab", type=int, default=None,
                    help="pad the vocabulary with plain-word tokens to this size")
    args = ap.parse_args()

    reader = GGUFReader(args.src)
    arch = field_value(reader.fields["general.architecture"])
    writer = GGUFWriter(args.dst, arch)
    tokens = list(field_value(reader.fields["tokenizer.ggml.tokens"]))
    types = list(field_value(reader.fields["tokenizer.ggml.token_type"]))
    if args.vocab is not None:
        if args.vocab < len(tokens):
            sys.exit(f"--vocab {args.vocab} is below the tokenizer's {len(tokens)} tokens")
        start = len(tokens)
        tokens += [f"{SPACE}t{i}" for i in range(start, args.vocab)]
        types += [int(gguf.TokenType.NORMAL)] * (args.vocab - start)

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if name == "tokenizer.ggml.tokens":
            writer.add_array(name, tokens)
        elif name == "tokenizer.ggml.token_type":
            writer.add_array(name, types)
        elif name == f"{arch}.vocab_size":
            writer.add_uint32(name, len(tokens))
        elif kind == GGUFValueType.ARRAY:
            writer.add_array(name, field_value(field))
        else:
            writer.add_key_value(name, field_value(field), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{args.dst}: {len(tokens)} tokens, no tensors")


if __name__ == "__main__":
    main()
