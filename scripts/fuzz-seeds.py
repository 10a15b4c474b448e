#!/usr/bin/env python3
"""Writes the seed corpus of the reader fuzzers (scripts/fuzz.sh) into
Tests/Fuzz/corpus/TARGET/: small but real files of each format: safetensors
(F32/F16/BF16 tensors and metadata, as moe-gpu and Hugging Face write them),
GGUF (F32/F16/Q8_0 tensors, a byte-level BPE tokenizer), IDX images and
labels, a CSV image table, JSON and YAML training configs, a tokenizer.json.
Needs numpy, gguf and tokenizers (pip); run once, the outputs are committed."""
import json, os, struct, sys
import numpy as np

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fuzz", "corpus")

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def safetensors(tensors, metadata):
    header, blobs, off = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs += raw; off += len(raw)
    header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + blobs

rng = np.random.default_rng(0)
w = rng.standard_normal((4, 3)).astype(np.float32)
put("safetensors", "moe-gpu-vit.safetensors", safetensors({
    "blocks.0.mlp.fc1.weight": ("F32", [4, 3], w.tobytes()),
    "blocks.0.mlp.fc1.bias": ("F16", [4], rng.standard_normal(4).astype(np.float16).tobytes()),
    "blocks.0.mlp.fc2.weight": ("BF16", [3, 4], (w.T.copy().view(np.uint32) >> 16).astype(np.uint16).tobytes()),
}, {"format": "pt", "moe-gpu.config": json.dumps({"width": 3, "heads": 1})}))
put("safetensors", "empty.safetensors", safetensors({}, {"format": "pt"}))

import gguf
path = "/tmp/moe-gpu-fuzz-seed.gguf"
wr = gguf.GGUFWriter(path, "llama")
wr.add_block_count(1); wr.add_context_length(16); wr.add_embedding_length(32); wr.add_head_count(2)
wr.add_tokenizer_model("gpt2")
toks = [chr(c) for c in range(33, 127)] + ["Ġt", "he", "Ġthe"]
wr.add_token_list(toks); wr.add_token_types([1] * len(toks)); wr.add_token_merges(["Ġ t", "h e", "Ġt he"])
wr.add_bos_token_id(0); wr.add_eos_token_id(1)
wr.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float32))
wr.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((4, 32)).astype(np.float16))
q = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
wr.add_tensor("blk.0.ffn_down.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
put("gguf", "llama-tiny.gguf", open(path, "rb").read())

images = bytes(rng.integers(0, 256, 3 * 4 * 4, dtype=np.uint8))
put("idx", "images-idx3-ubyte", struct.pack(">IIII", 2051, 3, 4, 4) + images)
put("idx", "labels-idx1-ubyte", struct.pack(">II", 2049, 3) + bytes([0, 1, 2]))
put("csv", "table.csv", b"".join((",".join(str(v) for v in rng.integers(0, 256, 16)) + f",{i % 3}\n").encode() for i in range(4)))
put("config", "run.json", json.dumps({"steps": 20, "batchSize": 8, "model": {"width": 16, "moeBlocks": [1], "moe": {"router": "topk", "experts": 4}}}).encode())
put("config", "run.yaml", b"steps: 20\nbatchSize: 8\nmodel:\n  width: 16\n  moeBlocks: [1]\n  moe:\n    router: sphero\n    experts: 6\n")

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(["the cat sat on the mat", "to be or not to be"],
                        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
put("tokenizer", "tokenizer.json", tok.to_str().encode())
print("seeds written to", os.path.normpath(root))
