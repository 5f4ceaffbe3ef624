"""Helpers shared by the kernel launchers: interpreter detection, grid sizing and tile shapes."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

# Triton decides between compiled and interpreted kernels when `@triton.jit` runs, i.e. when the kernel
# modules are imported, so this is read once at import too.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs a persistent kernel launches per multiprocessor; under the interpreter every program runs in turn
# on the CPU, so a handful is both faster and still exercises the cross-program reduction.
_INTERPRETER_PROGRAMS = 3


_reference_only = threading.local()


@contextlib.contextmanager
def reference_only():
    """Within: `can_launch` is False everywhere, so ops compute with their PyTorch reference (after a kernel of
    theirs failed to compile)."""
    previous = getattr(_reference_only, "active", False)
    _reference_only.active = True
    try:
        yield
    finally:
        _reference_only.active = previous


def can_launch(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run on this tensor: on CUDA (eagerly or traced by torch.compile), and on
    real CPU tensors under the interpreter. CPU tensors being traced take the PyTorch reference instead,
    which Inductor compiles for the CPU."""
    if getattr(_reference_only, "active", False):
        return False
    if tensor.is_cuda:
        return True
    return INTERPRETING and tensor.device.type == "cpu" and not is_traced(tensor)


def is_traced(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a stand-in torch.compile traces with, whose values cannot be read."""
    return isinstance(tensor, (FakeTensor, FunctionalTensor))


def traceable(kernel):
    """`kernel` as the launchers call it: wrapped so that torch.compile sees and inlines the launch while it
    traces (a dispatch mode is then active), plain otherwise, as the wrapper costs host time on every eager
    launch; never wrapped under the interpreter, which torch.compile cannot trace."""
    if INTERPRETING or torch._C._len_torch_dispatch_stack() == 0:
        return kernel
    return torch.library.wrap_triton(kernel)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, per_multiprocessor: int) -> int:
    """How many programs a persistent (grid-stride) kernel launches on `device`, whatever the input size."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index) * per_multiprocessor


@dataclass(frozen=True)
class RowTile:
    """A [block_m, block_n] tile of a row-wise kernel: block_m rows at once, block_n columns per step."""

    block_m: int
    block_n: int
    num_warps: int
    single_pass: bool  # the whole row fits in one tile, so the kernel can keep it in registers


def row_tile(n_cols: int, *, max_block_n: int, tile_elements: int, elements_per_thread: int,
             max_warps: int = 32) -> RowTile:
    """Tile for a kernel that reduces along the rows (of `n_cols` elements) of a matrix.

    The tile does not depend on the number of rows, so a graph compiled for dynamic shapes gets no guard on
    it. `elements_per_thread` sets the warps: enough elements per thread for 16-byte loads, few enough to
    stay in registers (32 warps is the hardware limit per program; fewer warps leave each thread more
    registers, `max_warps` caps them).
    """
    block_n = min(triton.next_power_of_2(n_cols), max_block_n)
    block_m = max(1, tile_elements // block_n)
    num_warps = max(1, min(max_warps, (block_m * block_n) // (32 * elements_per_thread)))
    return RowTile(block_m, block_n, num_warps, single_pass=n_cols <= block_n)
