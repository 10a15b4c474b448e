#!/usr/bin/env python3
"""moe-gpu against Hugging Face transformers (torch CPU), by hand (issue 9).

Three checks, a table of figures and PASS/FAIL each; exit status 1 when any fails:

 1. SmolLM2-135M-Instruct (the Q4_1 GGUF of scripts/fetch-checkpoints.sh, which
    transformers dequantises to float32 with gguf_file=): loss and perplexity of
    `moe-gpu eval --seq-len N --json` on each validation play (hamlet_gut.txt,
    macbeth_gut.txt of scripts/fetch-data.sh) against transformers on the same
    ids (`moe-gpu tokenize --json`, never transformers' tokenizer) cut into the
    same windows as eval cuts them: [i*N, min((i+1)*N, count)), no BOS, every
    position of a window but the last predicting the next token, loss = sum of
    token losses / count. Tolerance 1e-4 relative. Also the first K per-token
    losses (-log softmax of the logits at the target, so a direct look at the
    logits: a wrong Q/K permutation would show here), taken from eval as
    differences of the mean losses of prefix windows (--seq-len L --limit 1).
    Whether transformers' own tokenizer gives the same ids is reported, not checked.
 2. Greedy generation: `moe-gpu generate --max-new-tokens 32 --json` (plain
    prompts and --chat) against transformers generate(do_sample=False,
    max_new_tokens=32) from the engine's prompt ids; the id lists must be
    identical up to the first stop token (the engine stops at EOS, and at
    <|im_end|> with --chat, without printing it).
 3. A fine-tuned Mixtral: `moe-gpu train --task lm` (byte-level 8 experts top-2,
    fine-tuned after the online upcycle), `moe-gpu export` to a Hugging Face
    folder, MixtralForCausalLM.from_pretrained in float32 (no missing or
    unexpected weights): the engine's eval loss on both plays, its first K
    per-token losses and its greedy generation against transformers', 1e-4
    relative. No moe-gpu command prints raw logits, so the logits are compared
    through the per-token losses (log-softmax at the target) and the loss.

Usage (scripts/transformers-check.sh builds the binary and calls this):
  python3 scripts/transformers-check.py --bin .build/release/moe-gpu
  python3 scripts/transformers-check.py --bin BIN --checks 1,2 --seq-len 512 --limit 4
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt"]
PROMPTS = [("The capital of France is", False),
           ("Once upon a time, in a small village,", False),
           ("def fibonacci(n):", False),
           ("What is the capital of France?", True),
           ("Write a haiku about the sea.", True)]
MIXTRAL_PROMPTS = ["To be, or not to be", "MACBETH. "]

rows = []  # (check, what, engine, transformers, difference, tolerance, ok)


class CommandFailed(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, what):
    """Runs a command (printed first), returns its stdout; exits with its stderr on failure."""
    log("$ " + " ".join(_quote(c) for c in cmd))
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        log(err)
        raise CommandFailed(f"{what} failed (exit {p.returncode}): {err.splitlines()[-1] if err else ''}")
    log(f"  ({time.time() - t:.1f} s)")
    return p.stdout.decode()


def _quote(s):
    return s if s and all(c.isalnum() or c in "/._-=:,+" for c in s) else "'" + s.replace("'", "'\\''") + "'"


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def add(check, what, engine, tf, diff, tol, ok):
    rows.append((check, what, engine, tf, diff, tol, ok))


def windows(count, n):
    """eval's windows: [s, min(s+n, count)) for s = 0, n, 2n, ... while s+1 < count."""
    out, s = [], 0
    while s + 1 < count:
        out.append((s, min(s + n, count)))
        s += n
    return out


# ---------------------------------------------------------------- engine side

def engine_ids(args, ckpt, path):
    return json.loads(run([args.bin, "tokenize", "--checkpoint", ckpt, "--text", path, "--json"], "moe-gpu tokenize"))


def engine_eval(args, ckpt, path, n, limit=None, quiet=False):
    cmd = [args.bin, "eval", "--checkpoint", ckpt, "--data", path, "--seq-len", str(n), "--json"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return json.loads(run(cmd, "moe-gpu eval").strip().splitlines()[-1])


def engine_token_losses(args, ckpt, path, k):
    """Losses of predicted positions 1..k of the text (position i predicted from ids[0:i]):
    eval --seq-len L --limit 1 gives the mean over the first L-1; successive differences."""
    sums = [0.0]
    for length in range(2, k + 2):
        r = engine_eval(args, ckpt, path, length, limit=1)
        assert r["tokens"] == length - 1, r
        sums.append(r["loss"] * r["tokens"])
    return [sums[i + 1] - sums[i] for i in range(k)]


def engine_generate(args, ckpt, prompt, chat, n):
    cmd = [args.bin, "generate", "--checkpoint", ckpt, "--prompt", prompt, "--max-new-tokens", str(n), "--json"]
    if chat:
        cmd.append("--chat")
    return json.loads(run(cmd, "moe-gpu generate").strip().splitlines()[-1])


# ---------------------------------------------------------------- transformers side

@torch.no_grad()
def tf_eval(model, ids, n, batch):
    """Sum of the next-token losses over eval's windows (float32 logits, float64 sum)."""
    ws = windows(len(ids), n)
    total, count, i = 0.0, 0, 0
    t = time.time()
    while i < len(ws):
        length = ws[i][1] - ws[i][0]
        j = i
        while j < len(ws) and j - i < batch and ws[j][1] - ws[j][0] == length:
            j += 1
        x = torch.tensor([ids[a:b] for a, b in ws[i:j]], dtype=torch.long)
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        total += loss.double().sum().item()
        count += loss.numel()
        i = j
    log(f"  transformers: {len(ws)} windows, {count} predicted tokens ({time.time() - t:.1f} s)")
    return total, count, len(ws)


@torch.no_grad()
def tf_token_losses(model, ids, k):
    x = torch.tensor([ids[: k + 1]], dtype=torch.long)
    logits = model(input_ids=x).logits.float()[0]
    return F.cross_entropy(logits[:-1], x[0, 1:], reduction="none").tolist()


@torch.no_grad()
def tf_generate(model, prompt_ids, n, stops):
    x = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                         eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0])
    new = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(new):
        if t in stops:
            return new[:i]
    return new


# ---------------------------------------------------------------- checks

def compare_plays(args, check, ckpt, model, n, plays, ids_of):
    """Eval loss/perplexity per play and over both (token-weighted), engine vs transformers."""
    e_sum = e_tok = t_sum = t_tok = 0
    for play, path in plays:
        ids = ids_of[play]
        ws = windows(len(ids), n)
        if args.limit is not None:
            ws = ws[: args.limit]
            ids = ids[: ws[-1][1]]
        e = engine_eval(args, ckpt, path, n, limit=args.limit)
        ts, tt, tw = tf_eval(model, ids, n, args.batch)
        if e["tokens"] != tt or e["windows"] != tw:
            add(check, f"{play}: windows / predicted tokens", f'{e["windows"]} / {e["tokens"]}', f"{tw} / {tt}",
                "-", "equal", False)
            continue
        tl = ts / tt
        add(check, f"{play} loss ({tw} x {n}, {tt} tokens)", e["loss"], tl, rel(e["loss"], tl), 1e-4, rel(e["loss"], tl) <= 1e-4)
        add(check, f"{play} perplexity", e["perplexity"], math.exp(tl), rel(e["perplexity"], math.exp(tl)), 1e-4,
            rel(e["perplexity"], math.exp(tl)) <= 1e-4)
        e_sum += e["loss"] * e["tokens"]; e_tok += e["tokens"]; t_sum += ts; t_tok += tt
    if len(plays) > 1 and e_tok and e_tok == t_tok:
        el, tl = e_sum / e_tok, t_sum / t_tok
        add(check, f"both plays loss ({t_tok} tokens)", el, tl, rel(el, tl), 1e-4, rel(el, tl) <= 1e-4)
        add(check, "both plays perplexity", math.exp(el), math.exp(tl), rel(math.exp(el), math.exp(tl)), 1e-4,
            rel(math.exp(el), math.exp(tl)) <= 1e-4)


def compare_token_losses(args, check, ckpt, model, path, ids, k):
    e = engine_token_losses(args, ckpt, path, k)
    t = tf_token_losses(model, ids, k)
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(e, t))
    add(check, f"first {k} per-token losses, max |d|/max(1,|l|)",
        " ".join(f"{v:.4f}" for v in e[:4]) + " ...", " ".join(f"{v:.4f}" for v in t[:4]) + " ...", worst, 1e-4, worst <= 1e-4)


def compare_generation(args, check, ckpt, model, prompts, stops_of):
    for prompt, chat in prompts:
        e = engine_generate(args, ckpt, prompt, chat, 32)
        stops = stops_of(chat)
        t = tf_generate(model, e["prompt_ids"], 32, stops)
        same = e["ids"] == t
        first = next((i for i, (a, b) in enumerate(zip(e["ids"], t)) if a != b), min(len(e["ids"]), len(t)))
        label = ("chat: " if chat else "") + repr(prompt)
        add(check, f"greedy 32 {label}", f'{len(e["ids"])} ids', f"{len(t)} ids",
            "identical" if same else f"differ at {first}", "identical", same)
        if not same:
            log(f"  engine:       {e['ids']}\n  transformers: {t}")


def check_smollm2(args, plays):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = args.gguf
    log(f"== 1/2: SmolLM2 {gguf}")
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    log(f"  transformers loaded {type(model).__name__} in {time.time() - t:.1f} s")
    ids_of = {}
    hf_tok = None
    try:
        hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    except Exception as ex:  # reported, not checked
        log(f"  transformers' tokenizer did not load: {ex}")
    for play, path in plays:
        ids_of[play] = engine_ids(args, gguf, path)
        if hf_tok is not None:
            with open(path, encoding="utf-8") as f:
                hf = hf_tok(f.read(), add_special_tokens=False)["input_ids"]
            info.append(f"transformers' tokenizer on {play}: {len(hf)} ids, "
                        + ("identical to moe-gpu's" if hf == ids_of[play] else f"moe-gpu has {len(ids_of[play])}: DIFFERENT"))
    if "1" in args.checks:
        compare_token_losses(args, "1 SmolLM2", gguf, model, plays[0][1], ids_of[plays[0][0]], args.k)
        compare_plays(args, "1 SmolLM2", gguf, model, args.seq_len, plays, ids_of)
    if "2" in args.checks:
        eos = model.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        im_end = None
        if hf_tok is not None:
            im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
        compare_generation(args, "2 generate", gguf, model, PROMPTS,
                           lambda chat: eos | ({im_end} if chat and im_end is not None else set()))
    del model


def check_mixtral(args, plays):
    from transformers import MixtralForCausalLM
    log(f"== 3: fine-tuned Mixtral {args.run} -> {args.hf}")
    if not os.path.exists(os.path.join(args.run, "model.safetensors")) or args.retrain:
        if os.path.exists(args.run):
            shutil.rmtree(args.run)
        run([args.bin, "train", "--task", "lm", "--steps", "30", "--dense-steps", "60", "--out", args.run], "moe-gpu train")
    run([args.bin, "export", "--run", args.run, "--to", args.hf, "--force"], "moe-gpu export")
    model, loading = MixtralForCausalLM.from_pretrained(args.hf, dtype=torch.float32, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    add("3 Mixtral", "from_pretrained: missing / unexpected weights", "-", str(bad) if bad else "none", "-", "none", not bad)
    cfg = model.config
    info.append(f"exported Mixtral: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
                f"top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, {sum(p.numel() for p in model.parameters())} parameters")
    n = min(args.seq_len, cfg.max_position_embeddings)
    ids_of = {play: engine_ids(args, args.run, path) for play, path in plays}
    compare_token_losses(args, "3 Mixtral", args.run, model, plays[0][1], ids_of[plays[0][0]], args.k)
    compare_plays(args, "3 Mixtral", args.run, model, n, plays, ids_of)
    compare_generation(args, "3 Mixtral", args.run, model, [(p, False) for p in MIXTRAL_PROMPTS],
                       lambda chat: {cfg.eos_token_id})


# ---------------------------------------------------------------- main

info = []


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.6f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, ".build", "release", "moe-gpu"), help="the moe-gpu binary")
    ap.add_argument("--checks", default="1,2,3", help="which checks: 1 (perplexity), 2 (generation), 3 (Mixtral)")
    ap.add_argument("--gguf", help="the SmolLM2 GGUF (default: from scripts/fetch-checkpoints.sh)")
    ap.add_argument("--data", help="the Shakespeare folder (default: from scripts/fetch-data.sh)")
    ap.add_argument("--seq-len", type=int, default=512, help="eval window (tokens)")
    ap.add_argument("--limit", type=int, help="only the first N windows of each play (default all)")
    ap.add_argument("--batch", type=int, default=2, help="transformers windows per forward")
    ap.add_argument("--k", type=int, default=8, help="per-token losses compared at the start of Hamlet")
    ap.add_argument("--run", default="/tmp/xcheck-run", help="Mixtral run folder (trained when missing)")
    ap.add_argument("--hf", default="/tmp/xcheck-hf", help="where the run is exported")
    ap.add_argument("--retrain", action="store_true", help="train the Mixtral run again even when it exists")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json-out", help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"transformers-check: no moe-gpu binary at {args.bin}: build it (swift build -c release --product moe-gpu) or pass --bin")
    try:
        if args.gguf is None:
            args.gguf = os.path.join(run([os.path.join(ROOT, "scripts", "fetch-checkpoints.sh")], "fetch-checkpoints").strip(), GGUF_NAME)
        if args.data is None:
            args.data = run([os.path.join(ROOT, "scripts", "fetch-data.sh")], "fetch-data").strip().splitlines()[-1]
        engine_version = run([args.bin, "--version"], "moe-gpu --version").strip()
    except CommandFailed as ex:
        sys.exit(f"transformers-check: {ex}")
    plays = [(p, os.path.join(args.data, p)) for p in PLAYS]

    import transformers
    try:
        import gguf as gguf_module
        from importlib.metadata import version
        gguf_version = version("gguf")
    except Exception:
        gguf_version = "missing"
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    versions = (f"moe-gpu {engine_version} ({commit}{'+changes' if dirty else ''}), torch {torch.__version__}, "
                f"transformers {transformers.__version__}, gguf {gguf_version}, Python {platform.python_version()}, "
                f"{args.threads} torch threads")
    start = time.time()
    for wanted, check, name in (("12", check_smollm2, "1/2 SmolLM2"), ("3", check_mixtral, "3 Mixtral")):
        if any(c in args.checks for c in wanted):
            try:
                check(args, plays)
            except CommandFailed as ex:
                add(name, "could not run", "-", "-", str(ex), "-", False)

    print(f"moe-gpu vs Hugging Face transformers, {datetime.date.today().isoformat()}: {versions}")
    for line in info:
        print("  " + line)
    head = ("check", "quantity", "moe-gpu", "transformers", "rel. diff", "tol.", "")
    table = [head] + [(c, w, fmt(e), fmt(t), fmt(d), fmt(tol), "PASS" if ok else "FAIL") for c, w, e, t, d, tol, ok in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip())
    failed = sum(1 for r in rows if not r[-1])
    print(f"{len(rows) - failed}/{len(rows)} PASS{'' if not failed else f', {failed} FAIL'} ({time.time() - start:.0f} s)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"versions": versions, "info": info, "rows": [dict(zip(("check", "quantity", "engine", "transformers",
                       "difference", "tolerance", "ok"), r)) for r in rows]}, f, indent=1)
    sys.exit(1 if failed or not rows else 0)


if __name__ == "__main__":
    main()
