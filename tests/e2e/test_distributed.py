"""DDP, FSDP2 and DeepSpeed ZeRO-3 with the liger backend, two processes on the CPU (gloo, through torchrun and
examples/train_distributed.py): every rank trains on its slice of one global batch, and the losses and first-step
gradients must equal eager training of one process on the whole batch. The backend sees only fragments there (a
graph per DDP bucket; graphs split at FSDP2's and DeepSpeed's hooks), and every rewrite it makes in them must be
exact."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import assert_close

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_distributed.py")
sys.path.insert(0, os.path.dirname(EXAMPLE))
import train_distributed  # noqa: E402

STEPS = 2


def eager_training(model_type: str, checkpointing: bool):
    model = train_distributed.tiny_model(model_type).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, gradients = [], None
    for step, ids in enumerate(train_distributed.global_batches(STEPS)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, gradients


def run_until_written(command, out, timeout=300, exit_grace=30):
    """Run `command` until it exits, and return `out`, which it must have written. A run still not gone
    `exit_grace` seconds after writing `out` is killed and counted: gloo's process group can deadlock in its
    destructor at exit (its worker thread waits for the GIL that the main thread, joining it, holds), after
    everything was computed."""
    log = out.with_suffix(".log")
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    started, written = time.monotonic(), None
    while process.poll() is None:
        now = time.monotonic()
        written = written or (now if out.exists() else None)
        if (written and now - written > exit_grace) or now - started > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            assert written, f"no result after {timeout} s: {log.read_text()[-3000:]}"
            return out
        time.sleep(0.5)
    assert process.returncode == 0, log.read_text()[-3000:]
    return out


# DeepSpeed is not a test dependency (PyPI has it as a source package only): its run is where it is installed. Its
# hooks on every module, which gather and release the partitioned parameters, split the graphs inside the
# modules: fewer patterns lie whole in one fragment than under DDP, and those rewritten must be exact.
WITH_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is optional")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU run (gloo); on GPUs the example runs with NCCL by hand")
@pytest.mark.parametrize("wrapper,checkpointing", [("ddp", False), ("fsdp2", True),
                                                   pytest.param("zero3", False, marks=WITH_DEEPSPEED)],
                         ids=["ddp", "fsdp2-checkpointing", "deepspeed-zero3"])
def test_data_parallel_training_equals_one_process_on_the_whole_batch(wrapper, checkpointing, tmp_path):
    out = tmp_path / "result.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               EXAMPLE, "--wrapper", wrapper, "--steps", str(STEPS), "--compiler", "aot_eager", "--out", str(out)]
    if checkpointing:
        command.append("--checkpointing")
    result = torch.load(run_until_written(command, out))
    losses, gradients = eager_training("llama", checkpointing)

    assert result["failures"] == []
    for counts in result["counts"]:  # each rank rewrote norms and the loss in its fragments (DDP's: every pattern)
        assert counts["rms_norm"] > 0 and counts["cross_entropy"] == 1, result["counts"]
    assert_close(torch.tensor(result["losses"]), torch.tensor(losses))
    assert result["gradients"].keys() == gradients.keys()
    for name, grad in gradients.items():
        assert_close(result["gradients"][name], grad, rtol=1e-4, atol=1e-5)


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_tensor_parallel_dtensors_are_left_to_pytorch(one_process_group):
    """DTensor inputs (tensor parallelism): the ops have no sharding rules, so a match over DTensors is reported
    and left to DTensor's own ops, and the compiled result is eager's; called eagerly, PyTorch's error names the op."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tests.helpers import compile_and_report

    mesh = init_device_mesh("cpu", (1,))
    norm = LlamaRMSNorm(16)
    norm.weight = torch.nn.Parameter(distribute_tensor(torch.randn(16), mesh, [Replicate()]))
    x = distribute_tensor(torch.randn(4, 16), mesh, [Shard(0)])
    out, report = compile_and_report(norm, x)
    assert report.counts()["rms_norm"] == 0 and not report.failures
    assert ["DTensor (tensor-parallel)" in m.reason for m in report.near_misses] == [True]
    assert_close(out.full_tensor(), norm(x).full_tensor())
    with pytest.raises(NotImplementedError, match="liger.rms_norm_forward.default does not have a sharding strategy"):
        torch.ops.liger.rms_norm(x, norm.weight, 1e-6)
