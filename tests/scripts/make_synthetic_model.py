"""Write a tiny random-weight GGUF model of a given architecture with the `gguf` Python package
(llama.cpp's own writer), so stage splitting is tested on architectures that have no small real
model here.

usage: make_synthetic_model.py ARCH OUT.gguf [--layers N] [--seed S] [--width W]
ARCH: llama (GQA), qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3, mistral3

Shapes look like real ones where it matters for exactness: n_embd = 160 (sqrt(n_embd) is not a
power of two, so a wrongly applied input scale changes bits), grouped-query attention (5 query
heads, 1 KV head), 16 layers by default (two per stage at 8 stages), windowed and full layers
where the architecture has both. Some per-layer hyperparameters are written as per-layer arrays
(uniform values), so stage files must slice them. The vocabulary is a SentencePiece-style
table (3 specials, 256 byte tokens, filler pieces) that llama.cpp loads; tests feed token ids.
Weights are F16 (F32 for norms and biases), seeded.
"""
import argparse

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 160
N_HEAD = 5
N_HEAD_KV = 1
HEAD_DIM = 32
# Gemma's heads are wider than n_embd / n_head (as in the real models), which is what makes
# llama.cpp's size-class attention scale matter.
HEAD_DIM_GEMMA = 48
N_FF = 384
N_VOCAB = 512
N_EXPERT = 8
N_EXPERT_USED = 2
N_FF_EXP = 96
CONTEXT = 4096
WINDOW = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--width", type=int, default=1,
                    help="scale n_embd, heads and n_ff by this (16 with 32 layers: a 4 GB llama)")
    args = ap.parse_args()
    global N_EMBD, N_HEAD, N_HEAD_KV, N_FF
    N_EMBD, N_HEAD, N_HEAD_KV, N_FF = (N_EMBD * args.width, N_HEAD * args.width,
                                       N_HEAD_KV * args.width, N_FF * args.width)
    arch, n_layer = args.arch, args.layers
    head_dim = HEAD_DIM_GEMMA if arch.startswith("gemma") else HEAD_DIM
    rng = np.random.default_rng(args.seed)

    def mat(rows: int, cols: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * s).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.05 * rng.standard_normal(n)).astype(np.float32)

    w = GGUFWriter(args.out, arch)
    w.add_name("tiny random model")  # no arch name in it: llama.cpp keys vocab quirks on names
    w.add_context_length(CONTEXT)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0 if arch == "gemma3" else 10000.0)
    w.add_file_type(1)  # mostly F16
    # Per-layer arrays (uniform) where the architecture reads them per layer.
    if arch in ("llama", "qwen3moe"):
        w.add_feed_forward_length([N_FF] * n_layer)
    else:
        w.add_feed_forward_length(N_FF)
    if arch in ("qwen3", "qwen3moe"):
        w.add_head_count([N_HEAD] * n_layer)
    else:
        w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    if arch in ("gemma2", "gemma3", "mistral3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_sliding_window(WINDOW)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if arch == "gemma3":
        w.add_sliding_window(WINDOW)
        w.add_rope_freq_base_swa(10000.0)
    if arch == "qwen3moe":
        w.add_expert_count(N_EXPERT)
        w.add_expert_used_count(N_EXPERT_USED)
        w.add_expert_feed_forward_length(N_FF_EXP)

    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    tokens += [("\u2581t%d" % i).encode() for i in range(N_VOCAB - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (N_VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(N_VOCAB)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    q_dim, kv_dim = N_HEAD * head_dim, N_HEAD_KV * head_dim
    w.add_tensor("token_embd.weight", mat(N_VOCAB, N_EMBD, 1.0 if arch.startswith("gemma") else 0.5))
    w.add_tensor("output_norm.weight", norm(N_EMBD))
    if arch in ("llama", "qwen3moe", "mistral3"):  # the others tie the output to the embedding
        w.add_tensor("output.weight", mat(N_VOCAB, N_EMBD))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(N_EMBD))
        if arch == "phi3":
            w.add_tensor(b + "attn_qkv.weight", mat(q_dim + 2 * kv_dim, N_EMBD))
        else:
            w.add_tensor(b + "attn_q.weight", mat(q_dim, N_EMBD))
            w.add_tensor(b + "attn_k.weight", mat(kv_dim, N_EMBD))
            w.add_tensor(b + "attn_v.weight", mat(kv_dim, N_EMBD))
        if arch == "qwen2":
            w.add_tensor(b + "attn_q.bias", bias(q_dim))
            w.add_tensor(b + "attn_k.bias", bias(kv_dim))
            w.add_tensor(b + "attn_v.bias", bias(kv_dim))
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            w.add_tensor(b + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(b + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(b + "attn_output.weight", mat(N_EMBD, q_dim))
        if arch in ("gemma2", "gemma3"):
            w.add_tensor(b + "post_attention_norm.weight", norm(N_EMBD))
            w.add_tensor(b + "post_ffw_norm.weight", norm(N_EMBD))
        w.add_tensor(b + "ffn_norm.weight", norm(N_EMBD))
        if arch == "qwen3moe":
            w.add_tensor(b + "ffn_gate_inp.weight", mat(N_EXPERT, N_EMBD).astype(np.float32))
            experts = lambda r, c: np.stack([mat(r, c) for _ in range(N_EXPERT)])  # noqa: E731
            w.add_tensor(b + "ffn_gate_exps.weight", experts(N_FF_EXP, N_EMBD))
            w.add_tensor(b + "ffn_up_exps.weight", experts(N_FF_EXP, N_EMBD))
            w.add_tensor(b + "ffn_down_exps.weight", experts(N_EMBD, N_FF_EXP))
        elif arch == "phi3":
            w.add_tensor(b + "ffn_up.weight", mat(2 * N_FF, N_EMBD))
            w.add_tensor(b + "ffn_down.weight", mat(N_EMBD, N_FF))
        else:
            w.add_tensor(b + "ffn_gate.weight", mat(N_FF, N_EMBD))
            w.add_tensor(b + "ffn_up.weight", mat(N_FF, N_EMBD))
            w.add_tensor(b + "ffn_down.weight", mat(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
