"""SDPA at the Llama-3-8B shape (B2, 32 query heads, 8 key/value heads, T4096, D128, bf16), forward+backward:
a spelled-out causal mask with repeated keys and values (what a compiled step ran under gradient checkpointing
before the attention rewrite read that mask) against is_causal + enable_gqa. Writes sdpa_mask_8b.json to --out.

    python benchmarks/probe_sdpa_mask.py --out benchmarks/results
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", required=True)
out_dir = parser.parse_args().out
if not torch.cuda.is_available():
    raise SystemExit("probe_sdpa_mask: no CUDA device; nothing measured")
B, H, HKV, T, D = 2, 32, 8, 4096, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()[None, None].expand(B, 1, T, T)
dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
def masked():
    kr, vr = (x[:, :, None].expand(B, HKV, H // HKV, T, D).reshape(B, H, T, D) for x in (k, v))
    out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    return torch.autograd.grad(out, (q, k, v), dout)
def causal():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return torch.autograd.grad(out, (q, k, v), dout)
a, b = masked(), causal()
res = {"max_abs_diff_grads": max((x - y).abs().max().item() for x, y in zip(a, b))}
for name, fn in (("masked_repeated_kv", masked), ("is_causal_enable_gqa", causal)):
    res[name + "_ms"] = do_bench(fn, warmup=10, rep=100)
res["difference_x_32_layers_ms"] = 32 * (res["masked_repeated_kv_ms"] - res["is_causal_enable_gqa_ms"])
print(json.dumps(res))
with open(os.path.join(out_dir, "sdpa_mask_8b.json"), "w") as f:
    json.dump(res, f, indent=1)
