import os

import torch

# Without a GPU the CPU path of every op runs the real Triton kernels through the interpreter. Triton reads
# this when the kernels are defined, so it must be set before liger_compile is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import liger_compile  # noqa: E402,F401  (registers the liger ops)
from liger_compile.kernels import _launch as launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=["kernel", "reference"])
def op_path(request, monkeypatch):
    """Run an op test through the Triton kernel (CUDA, or the interpreter) and through the CPU reference."""
    if request.param == "reference":
        if DEVICE != "cpu":
            pytest.skip("the reference path runs on CPU tensors")
        monkeypatch.setattr(launch, "INTERPRETING", False)  # CPU tensors then take the reference path
    elif DEVICE == "cpu" and not launch.INTERPRETING:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return request.param


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo's caches would otherwise carry compiled code between tests."""
    torch._dynamo.reset()
    yield
