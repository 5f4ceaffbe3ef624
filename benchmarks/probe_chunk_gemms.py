"""The three GEMMs of a row-chunked fused linear loss, per chunk size, at the Llama-3-8B lm_head shape (8192 rows,
hidden 4096, vocab 128256, bf16): the chunk's logits, the hidden gradient (chunk x vocab times vocab x hidden: few
output tiles at small chunks) with and without splitting its reduction over the vocabulary into a batched GEMM,
and the weight gradient's accumulation (a read-modify-write of the whole weight gradient per chunk). Times are for
all 8192 rows. Writes chunk_gemms.json to --out.

    python benchmarks/probe_chunk_gemms.py --out benchmarks/results
"""
import argparse
import json
import os

import torch
from triton.testing import do_bench

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", required=True)
out_dir = parser.parse_args().out
if not torch.cuda.is_available():
    raise SystemExit("probe_chunk_gemms: no CUDA device; nothing measured")
N, H, V = 8192, 4096, 128256
g = torch.Generator(device="cuda").manual_seed(0)
hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=g)
weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
grad_weight = torch.zeros_like(weight)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def split_k_mm(dlogits, splits):
    """dlogits @ weight with the vocabulary reduction split `splits` ways: one batched GEMM, fp32 partials."""
    rows, part = dlogits.shape[0], V // splits
    a = dlogits.view(rows, splits, part).transpose(0, 1)
    b = weight.view(splits, part, H)
    try:
        partial = torch.bmm(a, b, out_dtype=torch.float32)
    except TypeError:
        partial = torch.bmm(a, b)
    return partial.sum(0).to(dlogits.dtype)


for chunk in (256, 512, 1024, 2048, 4096):
    times = N // chunk
    h = hidden[:chunk]
    dlogits = torch.randn(chunk, V, device="cuda", dtype=torch.bfloat16, generator=g)
    row = {"logits": do_bench(lambda: h @ weight.t()) * times,
           "grad_hidden": do_bench(lambda: dlogits @ weight) * times,
           "grad_weight_accumulate": do_bench(lambda: grad_weight.addmm_(dlogits.t(), h)) * times}
    for splits in (2, 4, 8, 16):
        if V % splits == 0:
            row[f"grad_hidden_split_{splits}"] = do_bench(lambda: split_k_mm(dlogits, splits)) * times
    exact = (dlogits.float() @ weight.float())
    row["split_4_rel_err"] = ((split_k_mm(dlogits, 4).float() - exact).norm() / exact.norm()).item()
    row["plain_rel_err"] = (((dlogits @ weight).float() - exact).norm() / exact.norm()).item()
    res[f"chunk_{chunk}"] = row
    print(chunk, json.dumps(row), flush=True)
res["full_gemm_ms"] = do_bench(lambda: hidden @ weight.t())
print(json.dumps(res))
with open(os.path.join(out_dir, "chunk_gemms.json"), "w") as f:
    json.dump(res, f, indent=1)
