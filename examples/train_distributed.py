"""Data-parallel training with the liger backend: DDP, FSDP2 (`fully_shard` per decoder layer, then the root) or
DeepSpeed ZeRO-3 (when deepspeed is installed), optionally with activation checkpointing and bf16 mixed precision,
on an HF model built from its config (random weights, no downloads), launched by torchrun:

    torchrun --nproc-per-node 2 examples/train_distributed.py --wrapper fsdp2|ddp|zero3 [--model llama] [--steps 8]
        [--checkpointing] [--bf16] [--compiler inductor|aot_eager] [--out result.pt]

On CUDA each process takes its GPU and NCCL; on CPU, gloo. Every rank trains on its own slice of one global
batch, so the losses and gradients equal one process's training on the whole batch: `--out` saves the per-step
losses (averaged over ranks), the first step's full gradients and every rank's rewrite counts, which
tests/e2e/test_distributed.py compares with eager single-process training. The backend sees the fragments the
wrappers hand it: one graph per DDP bucket (DDP's graph splitting), graphs split at FSDP2's hooks, and with ZeRO-3
graphs split at the hooks DeepSpeed puts on every module (compiled through DeepSpeed's `engine.compile`).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from liger_compile.report import collect

VOCAB, BATCH, SEQ = 512, 4, 16


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer transformers causal LM with random weights and dropout off (the same on every rank), of about 6 MB:
    several DDP buckets of 1 MB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=64)
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def global_batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(steps)]


def zero3_engine(model, bf16: bool, compiler: str):
    """A DeepSpeed ZeRO-3 engine around `model` with our AdamW, compiled by the liger backend."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(), "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}, "steps_per_print": 2**31}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    engine.compile(backend="liger", compile_kwargs={"options": {"compiler": compiler}})
    return engine


def wrap(model, wrapper: str, device: torch.device, bf16: bool):
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buckets as small as Dynamo's graph splitting takes (its first is 1 MB): several graph fragments even for
        # a tiny model, as a large one gives
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       bucket_cap_mb=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in model.model.layers:
        fully_shard(layer, **options)
    return fully_shard(model, **options)


def full_gradients(model, zero3: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (FSDP2's are sharded DTensors, ZeRO-3's partitions: gathered, on every
    rank)."""
    grads = {}
    for name, param in model.named_parameters():
        if zero3:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(param)
        else:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name.replace("module.", "", 1)] = grad.detach().float().cpu()
    return grads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrapper", choices=("ddp", "fsdp2", "zero3"), default="fsdp2")
    parser.add_argument("--model", default="llama", help="a transformers model_type")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision: FSDP2's bf16 compute with fp32 reductions, or ZeRO-3's bf16")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor")
    parser.add_argument("--out", help="save losses, first-step gradients and rewrite counts here (rank 0)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if BATCH % world:
        raise SystemExit(f"train_distributed: the global batch of {BATCH} does not split over {world} ranks")

    model = tiny_model(args.model).to(device).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    zero3 = args.wrapper == "zero3"
    if zero3:  # the engine owns the optimizer, backward and the step
        wrapped = compiled = zero3_engine(model, args.bf16, args.compiler)
        backward, optimizer_step = wrapped.backward, wrapped.step
    else:
        wrapped = wrap(model, args.wrapper, device, args.bf16)
        compiled = torch.compile(wrapped, backend="liger", options={"compiler": args.compiler})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def backward(loss):
            loss.backward()

        def optimizer_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    losses, first_gradients = [], None
    with collect() as report:
        for step, ids in enumerate(global_batches(args.steps)):
            local = ids.chunk(world)[rank].to(device)
            loss = compiled(input_ids=local, labels=local).loss
            backward(loss)
            if step == 0:
                first_gradients = full_gradients(wrapped, zero3)
            optimizer_step()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
    counts = [None] * world
    dist.all_gather_object(counts, report.counts())
    if rank == 0:
        print(f"{args.wrapper} on {world} ranks ({device.type}): {len(report.graphs)} graphs on rank 0, rewrites per "
              f"rank {counts}")
        print("losses: " + " ".join(f"{loss:.6f}" for loss in losses))
        if args.out:
            torch.save({"losses": losses, "gradients": first_gradients, "counts": counts,
                        "failures": [f.error for f in report.failures]}, args.out)
    # Last, a collective without Python tensors: gloo's worker thread would otherwise release all_gather_object's
    # tensors (which takes the GIL) while the exiting main thread joins it (holding the GIL) - a deadlock.
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
