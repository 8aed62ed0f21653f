#!/usr/bin/env python3
"""PyTorch reference throughput for a Llama training step (forward + backward + AdamW step).

Usage:
  .venv/bin/python scripts/bench_lm_pytorch.py --config CONFIG --batch B --seq T --steps N \
      --warmup W --threads K --device cpu|cuda [--bf16] [--attn sdpa|eager] [--peak-tflops 989]

  CONFIG  an HF Llama config.json (or a directory holding one); weights are random
          (LlamaForCausalLM(config), seed 0), tokens are one fixed random [B, T+1] batch.

fp32 weights and AdamW states always (lr 1e-4, torch defaults otherwise); --bf16 runs forward
and loss under torch.autocast(device, bfloat16) with fp32 master weights. W untimed steps,
then N steps each timed with device synchronisation before and after.

Prints one JSON line: tokens_per_s (B*T / median step time), step_ms_median, n_params
(unique parameters, a tied embedding counted once), mfu (cuda only, else null), plus the
settings. MFU = (6*N_mm + 12*L*d*T) * tokens_per_s / (peak_tflops*1e12), the PaLM formula:
N_mm = parameters that take part in matmuls (n_params minus the input embedding table when
it is untied; with tying it is the lm_head and stays in), L layers, d hidden size, T sequence
length (attention counted as if non-causal, as in PaLM). Default peak 989 TFLOP/s is H100/H200
dense bf16; pass the fp32/TF32 peak yourself for a fp32 run.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing hf_llama
from hf_llama import die, torch, transformers

F = torch.nn.functional


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()
    if a.steps < 1:
        die("--steps must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda but torch.cuda.is_available() is False")
    path = os.path.join(a.config, "config.json") if os.path.isdir(a.config) else a.config
    cfg = transformers.LlamaConfig.from_json_file(path)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    model = model.to(dev).train()
    params = list(model.parameters())  # unique: a tied embedding/lm_head appears once
    n_params = sum(t.numel() for t in params)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    n_mm = n_params - (0 if tied else model.model.embed_tokens.weight.numel())
    opt = torch.optim.AdamW(params, lr=1e-4)
    V = cfg.vocab_size
    w = torch.randint(V, (a.batch, a.seq + 1), device=dev)
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tps = a.batch * a.seq / med
    flops_per_token = 6 * n_mm + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq
    mfu = flops_per_token * tps / (a.peak_tflops * 1e12) if a.device == "cuda" else None
    print(json.dumps({
        "tokens_per_s": round(tps, 1), "step_ms_median": round(med * 1e3, 3), "n_params": n_params,
        "mfu": None if mfu is None else round(mfu, 4), "device": a.device, "bf16": a.bf16,
        "attn": a.attn, "batch": a.batch, "seq": a.seq, "steps": a.steps, "threads": a.threads,
        "n_matmul_params": n_mm, "final_loss": round(loss.item(), 4),
        "torch": torch.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
