#!/usr/bin/env python3
"""The Llama-3-Meets-MoE question at small scale (EXPERIMENTS.md).

From one dense byte-level Llama pretrained on Shakespeare (cached), for each
seed: upcycle to 8 experts top-2 and train N steps; continue the dense model
for the same N steps (same tokens); continue it for the MoE run's training
FLOPs (more steps). Prints the validation-loss curves as a markdown table and
the final losses with mean and spread over seeds.

    python3 scripts/lm-experiment.py --bin .build/release/moe-gpu --seeds 0 1 2
"""
import argparse, json, math, os, statistics, subprocess, sys


def curve(path):
    out = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if "eval_loss" in m:
                out[m["step"]] = m["eval_loss"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".build/release/moe-gpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/lm-experiment")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps of the continued runs (default: the recipe's)")
    a = ap.parse_args()
    runs = {}
    for s in a.seeds:
        out = os.path.join(a.out, f"seed{s}")
        cmd = [a.bin, "train", "--task", "lm", "--seed", str(s), "--equal-flops", "--device", a.device, "--out", out]
        if a.steps:
            cmd += ["--steps", str(a.steps)]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        runs[s] = {"moe": curve(os.path.join(out, "metrics.jsonl")),
                   "dense, same tokens": curve(os.path.join(out, "dense-continued", "metrics.jsonl")),
                   "dense, same FLOPs": curve(os.path.join(out, "dense-equal-flops", "metrics.jsonl"))}
    kinds = ["moe", "dense, same tokens", "dense, same FLOPs"]
    steps = sorted({st for r in runs.values() for k in kinds for st in r[k]})
    print("| step | " + " | ".join(f"{k} (mean ± sd over {len(a.seeds)} seeds)" for k in kinds) + " |")
    print("|--:|" + "--:|" * len(kinds))
    for st in steps:
        cells = []
        for k in kinds:
            v = [r[k][st] for r in runs.values() if st in r[k]]
            cells.append(f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}" if v else "")
        print(f"| {st} | " + " | ".join(cells) + " |")
    print()
    final = {k: [r[k][max(r[k])] for r in runs.values()] for k in kinds}
    for k in kinds:
        v = final[k]
        print(f"- final {k}: " + ", ".join(f"{x:.4f}" for x in v) + f" (mean {statistics.mean(v):.4f}, perplexity {math.exp(statistics.mean(v)):.3f})")
    json.dump({"seeds": a.seeds, "curves": {str(s): r for s, r in runs.items()}}, open(os.path.join(a.out, "summary.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
