#!/usr/bin/env python3
"""Training parity: the loss curve PyTorch gets from the same checkpoint, data and optimizer.

Usage:
  .venv/bin/python scripts/train_parity.py --model-dir DIR --windows WIN --batch B --seq T \
      --steps N --lr LR --beta1 B1 --beta2 B2 --eps EPS --weight-decay WD \
      [--optimizer adamw|adam] [--grad-clip C] [--threads 1] [--attn eager|sdpa] --out CSV

  DIR  config.json + model.safetensors (fp32, HF LlamaForCausalLM names): the initial weights.
  WIN  raw little-endian u32, N*B windows of T+1 tokens, row-major [N, B, T+1], in step order;
       step i uses rows [i*B, (i+1)*B): inputs w[:, :-1], targets w[:, 1:].

Each step: loss = mean cross-entropy over all B*T targets (F.cross_entropy on logits.view(-1, V),
computed here, not by HF's label shifting), backward, optional clip_grad_norm_(C) when C > 0,
then torch.optim.AdamW (decoupled decay) or torch.optim.Adam (L2 decay added to the gradient),
constant lr, foreach=False, model in fp32, train mode (Llama has no dropout). A tied
embedding/lm_head is one parameter (one Adam state, gradients of both uses summed).

Writes CSV `step,loss` (step 1..N; loss of step i is computed on batch i before update i) and
prints one line `train parity: final loss X, mean of last 10 losses Y`.
"""
import argparse
import sys

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing hf_llama
from hf_llama import die, load_model, read_tokens, set_threads, torch

F = torch.nn.functional


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.steps < 1:
        die("--steps must be >= 1")
    set_threads(a.threads)
    model = load_model(a.model_dir, a.attn).train()
    V = model.config.vocab_size
    w = read_tokens(a.windows, (a.steps, a.batch, a.seq + 1), V)
    opt_cls = torch.optim.AdamW if a.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                  weight_decay=a.weight_decay, foreach=False)
    losses = []
    for i in range(a.steps):
        x, y = w[i, :, :-1], w[i, :, 1:]
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        losses.append(loss.item())
    with open(a.out, "w") as f:
        f.write("step,loss\n")
        f.writelines(f"{i + 1},{l:.9g}\n" for i, l in enumerate(losses))
    last = losses[-10:]
    print(f"train parity: final loss {losses[-1]:.6f}, mean of last {len(last)} losses {sum(last) / len(last):.6f}")


if __name__ == "__main__":
    main()
