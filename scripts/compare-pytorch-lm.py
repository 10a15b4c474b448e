#!/usr/bin/env python3
"""PyTorch + transformers side of the language-model benchmark (issue 9).

One training step = forward + backward + AdamW on random token windows
(batch x sequence, next-token loss), for SmolLM2-135M dense or its Mixtral
8 x top-2 upcycle (every expert a copy of the dense MLP, router random).
Each model runs in its own process (they do not fit in memory together):

    python3 scripts/compare-pytorch-lm.py --gguf SmolLM2.gguf --model dense --steps 4
    python3 scripts/compare-pytorch-lm.py --gguf SmolLM2.gguf --model moe --steps 3

Prints one JSON line: median tokens/s over the timed steps (after one warm-up
step) and the process's peak RSS. `--threads` defaults to 2, as the engine's run.
"""
import argparse, json, os, resource, statistics, sys, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", choices=["dense", "moe"], default="dense")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    if a.model == "dense":
        model = dense
    else:
        c = dense.config
        mc = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
                           tie_word_embeddings=c.tie_word_embeddings, num_local_experts=a.experts,
                           num_experts_per_tok=a.top_k, sliding_window=None, torch_dtype=torch.float32)
        model = MixtralForCausalLM(mc)
        sd = dense.state_dict()
        with torch.no_grad():
            own = model.state_dict()
            for k, v in sd.items():
                if k in own and own[k].shape == v.shape:
                    own[k].copy_(v)
            for l in range(mc.num_hidden_layers):
                mlp = f"model.layers.{l}.mlp."
                experts = model.model.layers[l].mlp.experts if hasattr(model.model.layers[l], "mlp") else model.model.layers[l].block_sparse_moe.experts
                g, u, d = sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"], sd[mlp + "down_proj.weight"]
                # transformers >= 5 stacks experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]); 4.x keeps w1/w2/w3 per expert.
                if hasattr(experts, "gate_up_proj"):
                    experts.gate_up_proj.copy_(torch.cat([g, u], 0).unsqueeze(0).expand_as(experts.gate_up_proj))
                    experts.down_proj.copy_(d.unsqueeze(0).expand_as(experts.down_proj))
                else:
                    for e in experts:
                        e.w1.weight.copy_(g); e.w3.weight.copy_(u); e.w2.weight.copy_(d)
        del dense, sd
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=gen)
    times = []
    for step in range(a.steps + 1):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t)
    tokens = a.batch * a.seq_len
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"side": "pytorch", "model": a.model, "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "batch": a.batch, "seq_len": a.seq_len, "parameters": params,
                      "step_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    sys.exit(main())
