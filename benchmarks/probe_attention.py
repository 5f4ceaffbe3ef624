"""Why attention is slower under torch.compile in the 1B training step (benchmarks/results/attention_probe.txt):
the SDPA call Dynamo records from a tiny Llama with the installed transformers, and SDPA timed in the layouts
and mask forms a step can hand it (B=4, T=2048, 32 q heads, 8 kv heads, head_dim 64, bf16, fwd+bwd).

    python benchmarks/probe_attention.py      (needs CUDA)
"""
import sys

import torch
import torch.nn.functional as F
import transformers
import triton
from transformers import LlamaConfig, LlamaForCausalLM

if not torch.cuda.is_available():
    print("probe_attention: no CUDA device; this probe only measures GPUs.")
    sys.exit(0)
print("transformers", transformers.__version__, "torch", torch.__version__)
cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).cuda().bfloat16()
def backend(gm, example_inputs):
    for n in gm.graph.nodes:
        if "scaled_dot" in str(n.target):
            print("graph:", n.target, {k: (getattr(v, "name", v)) for k, v in n.kwargs.items()},
                  [tuple(a.meta["example_value"].stride()) for a in n.args[:3]])
    return gm
ids = torch.randint(0, 128, (2, 64), device="cuda")
torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
B, T, H, KV, D = 4, 2048, 32, 8, 64
def heads(n):  # HF: (B, T, n*D) projection viewed (B, T, n, D) and transposed
    return torch.randn(B, T, n, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
causal = torch.ones(T, T, device="cuda", dtype=torch.bool).tril()
variants = {
    "views, is_causal, enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    "contiguous, is_causal, enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True, enable_gqa=True),
    "views, is_causal, repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True),
    "views, bool mask, enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True),
}
variants["compiled: views, is_causal, enable_gqa"] = torch.compile(variants["views, is_causal, enable_gqa"])
for name, fn in variants.items():
    q, k, v = heads(H), heads(KV), heads(KV)
    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    step()
    print(f"{name:45} fwd+bwd {triton.testing.do_bench(step, warmup=10, rep=100):.3f} ms")
