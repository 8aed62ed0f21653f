"""Shared helpers for hf_parity.py, train_parity.py and bench_lm_pytorch.py (not a command).

Imports torch/numpy/transformers offline (exit 2 with a message when one is missing), loads a
Hugging Face Llama checkpoint directory strictly (fp32 tensors, no missing/unexpected/mismatched
names, tying as the config says) and reads raw little-endian u32 / f32 files.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die(msg, code=2):
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    sys.exit(code)


try:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError as e:
    die(f"{e.name or e} is not installed in this Python; run scripts/setup.sh and use .venv/bin/python")

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def set_threads(k, seed=0):
    torch.set_num_threads(k)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_model(model_dir, attn="eager"):
    """LlamaForCausalLM in fp32 from DIR/config.json + DIR/model.safetensors; any naming, shape,
    dtype or tying problem exits 2 instead of being silently re-initialised or converted."""
    from safetensors import safe_open

    st = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(st) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        die(f"{model_dir} needs config.json and model.safetensors")
    with safe_open(st, "pt") as f:
        names = set(f.keys())
        bad = sorted(k for k in names if f.get_slice(k).get_dtype() != "F32")
    if bad:
        die(f"tensors not F32 in {st}: {bad[:5]}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn,
            local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # shape mismatch, bad config, ...
        die(f"loading {model_dir} failed: {type(e).__name__}: {e}")
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        die(f"checkpoint does not match LlamaForCausalLM(config): {problems}")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied != bool(model.config.tie_word_embeddings):
        die(f"tie_word_embeddings={model.config.tie_word_embeddings} but lm_head is "
            f"{'tied' if tied else 'untied'} (a tied checkpoint must not contain lm_head.weight)")
    return model.float()


def read_raw(path, dtype, count, what):
    a = np.fromfile(path, dtype=dtype)
    if a.size != count:
        die(f"{what} {path}: {a.size} values, expected {count}")
    return a


def read_tokens(path, shape, vocab):
    """Raw little-endian u32 file of prod(shape) tokens, row-major -> int64 tensor of shape."""
    a = read_raw(path, "<u4", int(np.prod(shape)), "tokens")
    if a.size and int(a.max()) >= vocab:
        die(f"tokens {path}: token {int(a.max())} >= vocab_size {vocab}")
    return torch.from_numpy(a.astype(np.int64).reshape(shape))
