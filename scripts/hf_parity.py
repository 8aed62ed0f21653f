#!/usr/bin/env python3
"""Forward parity of Rust logits against transformers' LlamaForCausalLM on the same checkpoint.

Usage:
  .venv/bin/python scripts/hf_parity.py --model-dir DIR --tokens TOK --batch B --seq T \
      --logits LOGITS [--tol 1e-4] [--threads 1] [--attn eager|sdpa]

  DIR     config.json + model.safetensors (fp32, HF LlamaForCausalLM names), loaded offline.
  TOK     raw little-endian u32, B*T token ids, row-major [B, T]; positions 0..T-1 per row,
          causal attention, no padding/attention mask.
  LOGITS  raw little-endian f32, B*T*vocab_size values, row-major [B, T, vocab] (pre-softmax).

Prints one line, `hf parity: max abs diff X over N logits`; exits 0 when X <= tol, 1 otherwise
(NaN counts as a failure), 2 on a usage/input problem or when transformers is missing.
"""
import argparse
import sys

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing hf_llama
from hf_llama import die, load_model, np, read_raw, read_tokens, set_threads, torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--logits", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    a = p.parse_args()
    set_threads(a.threads)
    model = load_model(a.model_dir, a.attn).eval()
    vocab = model.config.vocab_size
    x = read_tokens(a.tokens, (a.batch, a.seq), vocab)
    theirs = read_raw(a.logits, "<f4", a.batch * a.seq * vocab, "logits").reshape(a.batch, a.seq, vocab)
    with torch.no_grad():
        ours = model(input_ids=x, use_cache=False).logits.numpy()
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
    print(f"hf parity: max abs diff {diff:.3e} over {ours.size} logits")
    raise SystemExit(0 if diff <= a.tol else 1)


if __name__ == "__main__":
    main()
