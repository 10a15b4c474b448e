#!/usr/bin/env python3
"""Side-by-side training speed: PyTorch (eager, CPU) vs `moe-gpu train --device cpu`.

Trains the same ViT / MoE models on Fashion-MNIST with both, alternating
(torch row, moe-gpu row, next row ...; several rounds), and prints the median
tokens/s after warm-up per row and the ratio moe-gpu / PyTorch. Every run is
appended to a JSON lines file (--out) with its per-step rates.

The PyTorch side is written as a PyTorch user would write it: eager mode,
torch.nn modules, F.scaled_dot_product_attention, AdamW(foreach=True),
clip_grad_norm_, F.cross_entropy(label_smoothing=...), data preloaded as
tensors and random batches from a seeded generator. Its hyperparameters come
from the config moe-gpu resolves (`moe-gpu train --config X --print-config`),
so both sides train the same model with the same optimiser settings.

Run by hand (scripts/compare-pytorch.sh builds the binary and calls this):
  python3 scripts/compare-pytorch.py --bin .build/release/moe-gpu
  python3 scripts/compare-pytorch.py --bin BIN --rows 1,2 --steps 40 --rounds 2
"""
import argparse
import gzip
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"
# Patchify's normalisation in Sources/MoEModel/Data.swift.
MEAN, STD = 0.2860, 0.3530


# ----------------------------------------------------------------------------
# Rows: moe-gpu configs (only what differs from moe-gpu's defaults; the rest is
# filled in by `--print-config`, which both sides then read).

def vit(width, depth, moe_blocks=(), moe=None, pool="cls"):
    m = {"imageSize": 28, "channels": 1, "patchSize": 7, "width": width, "depth": depth,
         "heads": 4, "mlpRatio": 4, "classes": 10, "pool": pool, "moeBlocks": list(moe_blocks)}
    if moe is not None:
        m["moe"] = moe
    return m


TOPK = {"router": "topk", "experts": 8, "topK": 2, "gateOrder": "softmax-topk", "renormalize": True,
        "auxLossCoefficient": 0.01, "zLossCoefficient": 0.001, "expertWidthRatio": 1, "jitter": 0}
SOFT = {"router": "soft", "experts": 8, "slotsPerExpert": 2}

ROWS = {
    1: ("ViT w64 d4 dense", lambda: vit(64, 4)),
    2: ("ViT w64 d4 top-2/8 dropless", lambda: vit(64, 4, [2, 3], dict(TOPK))),
    3: ("ViT w64 d4 Soft MoE 8x2", lambda: vit(64, 4, [2, 3], dict(SOFT))),
    4: ("ViT w128 d6 dense", lambda: vit(128, 6)),
    5: ("ViT w128 d6 top-2/8 dropless", lambda: vit(128, 6, [3, 4, 5], dict(TOPK))),
    6: ("default SpheroMoE (recipe)", None),  # the model section of `moe-gpu train --print-config`
}


def run_text(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def resolved_config(bin_path, model, args, workdir, name):
    """Writes the row's moe-gpu config and returns (path, config as moe-gpu resolves it)."""
    cfg = {"model": model, "batchSize": args.batch, "steps": args.steps, "evalEvery": 0, "logEvery": 1,
           "augment": False, "testExamples": args.test_examples, "seed": args.seed}
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    out = run_text([bin_path, "train", "--config", path, "--init", "scratch", "--print-config"])
    return path, json.loads(out[out.index("{"):])


# ----------------------------------------------------------------------------
# The PyTorch models.

def init_weights(module):
    # moe-gpu: Linear weights N(0, 0.02) truncated at 2 std, biases zero; LayerNorm 1/0.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


def expert(dim, hidden, dropout=0.0):
    layers = [nn.Linear(dim, hidden), nn.GELU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, dim))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TopKMoE(nn.Module):
    """Dropless token-choice top-k: softmax, top-k, renormalise; a loop over experts."""

    def __init__(self, dim, hidden, c):
        super().__init__()
        assert c["gateOrder"] == "softmax-topk" and c.get("capacityFactor") is None and not c["jitter"], \
            "only dropless softmax-topk without jitter is written here"
        self.k, self.renormalize = c["topK"], c["renormalize"]
        self.aux_coef, self.z_coef = c["auxLossCoefficient"], c["zLossCoefficient"]
        self.router = nn.Linear(dim, c["experts"], bias=False)
        self.experts = nn.ModuleList(expert(dim, hidden, c["dropout"]) for _ in range(c["experts"]))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, E = x.shape[0], len(self.experts)
        logits = self.router(x)
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            y = ex(x.index_select(0, token)) * weights[token, slot, None]
            out.index_add_(0, token, y)
        # Switch load balancing (the assignment fractions are constants) and router z-loss.
        frac = torch.bincount(chosen.flatten(), minlength=E).float() / (T * self.k)
        lb = E * (frac * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux = self.aux_coef * lb + self.z_coef * z
        return out.reshape(shape)


class SoftMoE(nn.Module):
    """Soft MoE (dot-product) and SpheroMoE (cosine, temperatures, core + universal experts).

    Per image: slots = softmax over tokens of the logits, mixing all tokens; each
    expert processes its slots; each token = softmax over slots, mixing the
    slot outputs. Slot s belongs to expert s // slotsPerExpert."""

    def __init__(self, dim, hidden, c):
        super().__init__()
        self.sphero = c["router"] == "sphero"
        self.per = c["slotsPerExpert"]
        E = c["experts"]
        slots = E * self.per
        self.phi = nn.Parameter(torch.empty(slots, dim))
        if self.sphero:
            nn.init.orthogonal_(self.phi)
            self.tau_dispatch = nn.Parameter(torch.full((1,), float(c["temperatureInit"])))
            self.tau_combine = nn.Parameter(torch.full((1,), float(c["temperatureInit"])))
            core = c["coreExperts"] if c["coreExperts"] > 0 else max(1, E // 3)
            noise = c.get("logitNoise")
            self.noise_std = 1.0 / slots if noise is None else noise
        else:
            nn.init.trunc_normal_(self.phi, std=dim ** -0.5, a=-2 * dim ** -0.5, b=2 * dim ** -0.5)
            core = E
            self.noise_std = c.get("logitNoise") or 0.0
        universal_hidden = max(1, math.floor(hidden * c["universalWidthRatio"] + 0.5))  # Swift .rounded()
        self.core_experts = nn.ModuleList(expert(dim, hidden, c["dropout"]) for _ in range(core))
        self.universal_experts = nn.ModuleList(expert(dim, universal_hidden, c["dropout"]) for _ in range(E - core))
        self.aux = None

    def forward(self, x):
        B, T, D = x.shape
        if self.sphero:
            scores = F.normalize(x, dim=-1, eps=1e-6) @ F.normalize(self.phi, dim=-1, eps=1e-6).t()
        else:
            scores = x @ self.phi.t()  # [B, T, S]
        if self.training and self.noise_std > 0:
            scores = scores + torch.randn_like(scores) * self.noise_std
        if self.sphero:
            dispatch = (scores / self.tau_dispatch).softmax(dim=1)
            combine = (scores / self.tau_combine).softmax(dim=2)
        else:
            dispatch, combine = scores.softmax(dim=1), scores.softmax(dim=2)
        slots = dispatch.transpose(1, 2) @ x  # [B, S, D]
        outs = [ex(slots[:, i * self.per:(i + 1) * self.per])
                for i, ex in enumerate(list(self.core_experts) + list(self.universal_experts))]
        return combine @ torch.cat(outs, dim=1)


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, moe=None, token_count=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = 0.0
        if moe is None:
            self.mlp = MLP(dim, hidden)
        else:
            expert_hidden = max(1, math.floor(hidden * moe["expertWidthRatio"] + 0.5))
            self.mlp = TopKMoE(dim, expert_hidden, moe) if moe["router"] == "topk" else SoftMoE(dim, expert_hidden, moe)
            self.drop_path = moe["stochasticDepth"]

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y = self.mlp(self.norm2(x))
        if self.training and self.drop_path > 0:
            keep = 1 - self.drop_path
            y = y * (torch.rand(x.shape[0], 1, 1) < keep).to(y.dtype) / keep
        return x + y


class ViT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.patch = m["patchSize"]
        D, hidden = m["width"], m["width"] * m["mlpRatio"]
        patches = (m["imageSize"] // self.patch) ** 2
        self.cls = m["pool"] == "cls"
        self.patch_embed = nn.Linear(self.patch * self.patch * m["channels"], D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if self.cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + self.cls, D))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        moe_blocks = set(m["moeBlocks"])
        self.blocks = nn.ModuleList(
            Block(D, m["heads"], hidden, m.get("moe") if i in moe_blocks else None) for i in range(m["depth"]))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, m["classes"])
        self.apply(init_weights)

    def forward(self, images):  # [B, C, H, W] -> logits [B, classes], auxiliary loss
        B, C, H, W = images.shape
        p = self.patch
        # Row-major patches, channel-last inside a patch (moe-gpu's Patchify layout).
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
        x = self.patch_embed(x)
        if self.cls:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        logits = self.head(x[:, 0] if self.cls else x.mean(dim=1))
        aux = [b.mlp.aux for b in self.blocks if getattr(b.mlp, "aux", None) is not None]
        return logits, (sum(aux) if aux else None)


def param_groups(model, weight_decay):
    """moe-gpu decays Linear / expert weights only: not biases, norms, embeddings,
    the class token, Soft MoE slot queries or temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        (decay if p.ndim >= 2 and leaf not in ("pos_embed", "cls_token", "phi") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(cfg, step):
    """TrainConfig.learningRate(at:): linear warm-up, cosine to the floor (steps from 1)."""
    peak, floor, warm, steps = cfg["learningRate"], cfg["minLearningRate"], cfg["warmupSteps"], cfg["steps"]
    if warm > 0 and step <= warm:
        return peak * step / warm
    progress = min(1.0, (step - warm) / max(steps - warm, 1))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def load_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
                data = f.read()
            dims = data[3]
            shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise FileNotFoundError(f"{stem}[.gz] not in {folder} (apt-get install dataset-fashion-mnist)")


def train_torch(cfg, images, labels, warmup, seed):
    """Trains cfg in PyTorch; returns the per-step seconds and the parameter count."""
    torch.manual_seed(seed)
    m = cfg["model"]
    model = ViT(m).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, cfg["weightDecay"]), lr=cfg["learningRate"],
                            betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(cfg, i + 1) / cfg["learningRate"])
    gen = torch.Generator().manual_seed(seed)
    tokens = cfg["batchSize"] * ((m["imageSize"] // m["patchSize"]) ** 2 + (m["pool"] == "cls"))
    times, losses = [], []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (cfg["batchSize"],), generator=gen)
        x, y = images[idx], labels[idx]
        logits, aux = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg["labelSmoothing"])
        if aux is not None:
            loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clipNorm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clipNorm"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    rates = [tokens / t for t in times]
    return {"params": params, "step_s": times, "tokens_per_s_steps": rates,
            "median_tokens_per_s": statistics.median(rates[warmup:]), "final_loss": losses[-1]}


# ----------------------------------------------------------------------------
# The moe-gpu side.

def moe_rates(lines, tokens_per_step, warmup, last_step):
    """Per-step tokens/s from metrics.jsonl, two ways.

    engine: the `tokens_per_s` field (a 20-step moving average in older builds,
    the rate over the logging window in newer ones);
    elapsed: from `elapsed_s`, read as the window's seconds, or as the run's
    cumulative seconds when it only grows and ends far above its median.
    Lines at or before the warm-up, and the last step (it includes the
    evaluation and checkpoint), are left out."""
    lines = [l for l in lines if "step" in l]
    engine, elapsed = [], []
    el = [l.get("elapsed_s") for l in lines]
    have_el = all(isinstance(v, (int, float)) for v in el) and len(el) > 2
    cumulative = have_el and all(b >= a for a, b in zip(el, el[1:])) and el[-1] > 3 * statistics.median(el)
    prev_step, prev_el = 0, 0.0
    for l, e in zip(lines, el):
        step = l["step"]
        keep = warmup < step < last_step and "accuracy" not in l
        if keep and "tokens_per_s" in l:
            engine.append(l["tokens_per_s"])
        if have_el:
            dt = e - prev_el if cumulative else e
            if keep and dt > 0:
                elapsed.append(tokens_per_step * (step - prev_step) / dt)
            prev_el = e
        prev_step = step
    return engine, elapsed


def train_moe(bin_path, cfg_path, cfg, warmup, env, prefix):
    out_dir = tempfile.mkdtemp(prefix="moe-gpu-compare-")
    try:
        t0 = time.perf_counter()
        r = subprocess.run(prefix + [bin_path, "train", "--config", cfg_path, "--init", "scratch", "--device", "cpu",
                                     "--steps", str(cfg["steps"]), "--out", out_dir],
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"moe-gpu train failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        found = re.search(r"training (\d+) parameters", r.stdout)
        device = re.search(r"^device (.*)$", r.stdout, re.M)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = [json.loads(s) for s in f if s.strip()]
        with open(os.path.join(out_dir, "eval.json")) as f:
            ev = json.load(f)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    m = cfg["model"]
    tokens = cfg["batchSize"] * ((m["imageSize"] // m["patchSize"]) ** 2 + (m["pool"] == "cls"))
    engine, elapsed = moe_rates(lines, tokens, warmup, cfg["steps"])
    rates = elapsed or engine
    if not rates:
        raise RuntimeError(f"no usable metrics lines after warm-up {warmup} ({len(lines)} lines)")
    return {"params": int(found.group(1)) if found else None, "eval_parameters": ev.get("parameters"),
            "device": device.group(1) if device else None, "rate_source": "elapsed_s" if elapsed else "tokens_per_s",
            "tokens_per_s_steps": rates, "engine_tokens_per_s_steps": engine,
            "median_tokens_per_s": statistics.median(rates),
            "median_engine_tokens_per_s": statistics.median(engine) if engine else None,
            "final_loss": ev.get("final_loss"), "process_wall_s": wall}


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=".build/release/moe-gpu", help="moe-gpu binary")
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (both sides)")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="1,2,3,4,5,6", help="comma-separated rows: " +
                    "; ".join(f"{k} {v[0]}" for k, v in ROWS.items()))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; moe-gpu gets the same cores")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--test-examples", type=int, default=250, help="moe-gpu's final evaluation (not timed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=DATA_DIR, help="folder of Fashion-MNIST IDX files")
    ap.add_argument("--out", default="results.jsonl", help="JSON lines file of every run (appended)")
    args = ap.parse_args()
    if args.steps < args.warmup + 3:
        ap.error("--steps must exceed --warmup by at least 3")
    bin_path = os.path.abspath(args.bin)
    if not os.access(bin_path, os.X_OK):
        sys.exit(f"no moe-gpu binary at {bin_path} (build it: swift build -c release --product moe-gpu, or pass --bin)")
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            sys.exit(f"unknown row {r}; rows are {sorted(ROWS)}")

    # Same cores for both: torch threads, and moe-gpu (its CPU backend uses every
    # core it may run on, OpenBLAS its own thread count).
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads))
    env.pop("MOE_GPU_DEVICE", None)
    prefix, ncpu = [], os.cpu_count() or 1
    if args.threads < ncpu and shutil.which("taskset") and hasattr(os, "sched_setaffinity"):
        cpus = set(range(args.threads))
        os.sched_setaffinity(0, cpus)
        prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))]
    elif args.threads > ncpu:
        print(f"warning: --threads {args.threads} > {ncpu} cores", file=sys.stderr)

    train = load_idx(args.data, "train-images-idx3-ubyte")
    images = ((torch.from_numpy(train.copy()).float() / 255 - MEAN) / STD).unsqueeze(1)  # [N, 1, 28, 28]
    labels = torch.from_numpy(load_idx(args.data, "train-labels-idx1-ubyte").astype(np.int64))

    workdir = tempfile.mkdtemp(prefix="compare-pytorch-")
    default_model = None
    cfgs = {}
    for r in rows:
        name, make = ROWS[r]
        if make is None:
            if default_model is None:
                out = run_text([bin_path, "train", "--print-config"])
                default_model = json.loads(out[out.index("{"):])["model"]
            model = default_model
        else:
            model = make()
        cfgs[r] = resolved_config(bin_path, model, args, workdir, f"row{r}")

    try:
        commit = run_text(["git", "-C", os.path.dirname(bin_path), "describe", "--always", "--dirty"]).strip()
    except Exception:
        commit = None
    meta = {"kind": "meta", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bin": bin_path, "bin_commit": commit,
            "torch": torch.__version__, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "batch": args.batch, "host": platform.node(), "cpus": ncpu,
            "loadavg_start": os.getloadavg()}
    results = {r: {"torch": [], "moe-gpu": []} for r in rows}
    loads = {r: [] for r in rows}
    params = {}
    with open(args.out, "a") as out:
        out.write(json.dumps(meta) + "\n")
        for rnd in range(args.rounds):
            for r in rows:
                path, cfg = cfgs[r]
                for side in ("torch", "moe-gpu"):
                    if side == "torch":
                        res = train_torch(cfg, images, labels, args.warmup, args.seed)
                    else:
                        res = train_moe(bin_path, path, cfg, args.warmup, env, prefix)
                    params[(r, side)] = res["params"]
                    results[r][side].append(res["median_tokens_per_s"])
                    loads[r].append(os.getloadavg()[0])
                    rec = {"kind": "run", "row": r, "name": ROWS[r][0], "side": side, "round": rnd,
                           "loadavg": os.getloadavg()[0], **res}
                    if side == "torch":
                        rec["config"] = cfg
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    print(f"round {rnd + 1}/{args.rounds} row {r} {side:7s} {res['median_tokens_per_s']:10.0f} tok/s"
                          f"  loss {res['final_loss']:.3f}", file=sys.stderr, flush=True)

        print(f"\nmoe-gpu {bin_path} ({commit or '?'}), torch {torch.__version__}, {args.threads} threads, "
              f"batch {args.batch}, {args.steps} steps, median after {args.warmup} warm-up steps, {args.rounds} rounds; "
              f"load {os.getloadavg()[0]:.2f}")
        hdr = f"{'row':>3}  {'model':30s} {'torch params':>12} {'moe params':>10}  {'torch tok/s':>11} {'moe-gpu tok/s':>13} {'moe/torch':>9} {'load':>5}"
        print(hdr)
        print("-" * len(hdr))
        notes = []
        for r in rows:
            m = cfgs[r][1]["model"]
            tp, mp = params[(r, "torch")], params[(r, "moe-gpu")]
            # moe-gpu folds the class token into the position table (cls + pos[0] is one vector).
            expected = mp + (m["width"] if m["pool"] == "cls" else 0) if mp is not None else None
            if expected != tp:
                notes.append(f"row {r}: parameter counts differ beyond the class token: torch {tp}, moe-gpu {mp}")
            t = statistics.median(results[r]["torch"])
            g = statistics.median(results[r]["moe-gpu"])
            print(f"{r:>3}  {ROWS[r][0]:30s} {tp:>12,} {mp:>10,}  {t:>11,.0f} {g:>13,.0f} {g / t:>9.2f} {max(loads[r]):>5.1f}")
            out.write(json.dumps({"kind": "summary", "row": r, "name": ROWS[r][0], "torch_params": tp, "moe_params": mp,
                                  "torch_tokens_per_s": t, "moe_tokens_per_s": g, "ratio": g / t,
                                  "torch_rounds": results[r]["torch"], "moe_rounds": results[r]["moe-gpu"]}) + "\n")
        print("torch params include a separate class token (width values) where pool is cls; moe-gpu folds it into pos_embed.")
        worst = max(max(v) for v in loads.values())
        if worst > ncpu:
            print(f"WARNING the 1-minute load average reached {worst:.1f} on {ncpu} cores (column load: the highest seen "
                  f"after a row's runs): other work competed for the cores; PyTorch's OpenMP threads suffer most from it.")
        for n in notes:
            print("WARNING " + n)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"every run: {os.path.abspath(args.out)}")
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
