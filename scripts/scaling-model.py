#!/usr/bin/env python3
"""Alpha-beta model of a data-parallel (DP) and an expert-parallel (EP inside
DP) training step at 8 to 512 GPUs, for docs/scaling.md.

Step time = compute + the collectives not hidden behind it (none are: moe-gpu
does not overlap its allreduce with the backward yet).
- compute: 6 x active parameters x tokens per GPU / (peak x MFU).
- allreduce (ring, bandwidth-optimal): 2 (n-1) alpha + 2 (n-1)/n x bytes / B,
  with B the slowest link of the ring: NVLink inside an 8-GPU node, the GPU's
  InfiniBand NIC across nodes.
- all-to-all over the EP group of e GPUs (inside one node here): (e-1) alpha +
  (e-1)/e x bytes / B_nvlink; four per MoE layer and step (dispatch and combine,
  forward and backward), each moving tokens x k x hidden x 4 bytes per GPU.
- EP splits each MoE layer's experts over e GPUs: expert gradients are summed
  over the n/e replicas only; dense gradients over all n.
Published figures: H200 (fp32 non-tensor 67 TFLOP/s; the engine computes in
fp32), NVLink 4 at 450 GB/s per direction, one 400 Gb/s NDR NIC (50 GB/s) per
GPU, alpha 3 us on NVLink and 5 us on InfiniBand. MFU 30%.

Usage: scripts/scaling-model.py  (prints the markdown tables of docs/scaling.md)
8, 16, 64 and 512 GPUs: 16 is the first size whose ring leaves one node.
"""

PEAK, MFU = 67e12, 0.30
NVLINK_B, NVLINK_A = 450e9, 3e-6
IB_B, IB_A = 50e9, 5e-6
GPUS_PER_NODE = 8

MODELS = {
    # name: dense params, expert params (all experts), active params, tokens per GPU per step, hidden, k, MoE layers, experts
    # SpheroMoE mixes every token into every expert's slots: no expert parallelism here (e = 1).
    "default ViT (SpheroMoE, 240,142 params)": dict(dense=240_142, experts=0, active=152_782, tokens=1024, hidden=64, k=2, layers=2, e=1),
    "SmolLM2-135M 8 x top-2 (692M params)": dict(dense=28_311_552 + 30 * (884_736 + 4_608 + 1_152) + 576,
                                                 experts=30 * 8 * 2_654_208, active=28_311_552 + 30 * (884_736 + 2 * 2_654_208),
                                                 tokens=8 * 2048, hidden=576, k=2, layers=30, e=8),
}


def allreduce(nbytes, n):
    if n == 1:
        return 0.0
    b, a = (NVLINK_B, NVLINK_A) if n <= GPUS_PER_NODE else (IB_B, IB_A)
    return 2 * (n - 1) * a + 2 * (n - 1) / n * nbytes / b


def alltoall(nbytes, e):
    if e == 1:
        return 0.0
    return (e - 1) * NVLINK_A + (e - 1) / e * nbytes / NVLINK_B


def step(m, n, ep):
    compute = 6 * m["active"] * m["tokens"] / (PEAK * MFU)
    grads = allreduce(4 * m["dense"], n) + allreduce(4 * m["experts"] / ep, n // ep)
    a2a = 4 * m["layers"] * alltoall(m["tokens"] * m["k"] * m["hidden"] * 4, ep)
    # fp32 weights and gradients (8 bytes a parameter) and AdamW's two moments (8 more).
    # EP: each rank holds only its experts. ZeRO-1 splits the moments of the
    # parameters every rank holds over all n ranks, and those of a rank's
    # experts over the n / ep ranks holding the same experts.
    held = m["dense"] + m["experts"] / ep
    state = 16 * held
    zero1 = 8 * held + 8 * m["dense"] / n + 8 * (m["experts"] / ep) / (n // ep)
    return compute, grads, a2a, (state, zero1)


def main():
    for name, m in MODELS.items():
        total = m["dense"] + m["experts"]
        print(f"### {name}\n")
        print(f"Gradient allreduce per step: {4 * total / 1e6:,.1f} MB (every parameter, fp32); "
              f"all-to-all per MoE layer and direction: {m['tokens'] * m['k'] * m['hidden'] * 4 / 1e6:,.2f} MB per GPU "
              f"({m['tokens']} tokens x k={m['k']} x hidden {m['hidden']} x 4 bytes).\n")
        print("| GPUs | layout | compute ms | gradient allreduce ms | all-to-all ms | step ms | state per GPU | with ZeRO-1 |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for n in (8, 16, 64, 512):
            rows = []
            for ep in sorted({1, min(m["e"], GPUS_PER_NODE)}):
                c, g, a, s = step(m, n, ep)
                rows.append((ep, c, g, a, s))
            best = min(rows, key=lambda r: r[1] + r[2] + r[3])[0]
            for ep, c, g, a, s in rows:
                layout = "DP" if ep == 1 else f"DP x EP{ep}"
                mark = " **(faster)**" if ep == best and len(rows) > 1 else ""
                print(f"| {n} | {layout}{mark} | {c * 1e3:.3f} | {g * 1e3:.3f} | {a * 1e3:.3f} | {(c + g + a) * 1e3:.3f} | "
                      f"{s[0] / 1e9:.3f} GB | {s[1] / 1e9:.3f} GB |")
        print()


if __name__ == "__main__":
    main()
