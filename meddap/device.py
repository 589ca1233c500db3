"""The one device rule and the one dtype rule of every command.

Device: a field holds None or "" (auto; "" is how a TOML file says it) or a name such as "cpu", "cuda", "cuda:1".
- None: the GPU of this process when torch sees one, else the CPU.
- "cuda" (no index) under torchrun (LOCAL_RANK set): cuda:LOCAL_RANK, so that
  the ranks of one machine do not all use GPU 0; otherwise the current GPU.
- A CUDA name on a machine without a usable GPU is an error, not a fallback.

Dtype: "fp32" | "fp16" | "bf16"; bf16 on a GPU without bf16 support is an error.

Bitwise reproducibility (the claims of train-lora, classify train and the
generation resume rule): it holds on the CPU with a fixed number of threads
(torch.get_num_threads(): CPU kernels split their sums by thread; torchrun sets
OMP_NUM_THREADS=1 for its ranks when it is unset, so they match a one-thread
run, not a default one). On CUDA it needs cuDNN's autotuner off (`pin_cudnn`,
called where such a claim is made, so each run picks the same convolution
algorithms) and `torch.use_deterministic_algorithms(True)` (with
CUBLAS_WORKSPACE_CONFIG=:4096:8), and even then it is not guaranteed: SDPA and
cuDNN backward kernels accumulate with atomics, and adaptive_avg_pool2d's
backward has no deterministic CUDA kernel.
"""
from __future__ import annotations

import os
import re

from meddap.errors import MeddapError

DEVICE_HELP = "cpu, cuda or cuda:N; empty: this process's GPU when there is one, else cpu"
DTYPES = ("fp32", "fp16", "bf16")
_DEVICE_NAME = re.compile(r"(cpu|cuda(:\d+)?|mps|meta)")


def check_device_name(name) -> str | None:
    """A settings check: None for a device name torch accepts or "" (auto), else the complaint (no torch import)."""
    if name == "":
        return None
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        return "is not a device; use cpu, cuda or cuda:N"
    return None


def check_dtype_name(name) -> str | None:
    return None if name in DTYPES else f"is not a dtype; choose one of {', '.join(DTYPES)}"


def resolve_device(name: str | None, flag: str = "--device"):
    """The torch.device of the rule above."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if name is None or name == "":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    complaint = check_device_name(name)
    if complaint:
        raise MeddapError(f"{flag} {name!r} {complaint}.")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MeddapError(f"{flag} {name}: no CUDA GPU is usable here; use cpu.")
        if device.index is None:
            index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
        if device.index >= torch.cuda.device_count():
            raise MeddapError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device=None, flag: str = "--dtype"):
    """torch dtype of "fp32" | "fp16" | "bf16", checked against the device."""
    import torch

    complaint = check_dtype_name(name)
    if complaint:
        raise MeddapError(f"{flag} {name!r} {complaint}.")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if dtype is torch.bfloat16 and device is not None and torch.device(device).type == "cuda" \
            and not torch.cuda.is_bf16_supported():
        raise MeddapError(f"{flag} bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          f"use fp16 or fp32.")
    return dtype


def pin_cudnn() -> None:
    """Turn cuDNN's autotuner off: `torch.backends.cudnn.benchmark = False` (torch's default).

    With it on, cuDNN times several convolution algorithms per input shape and keeps the
    fastest, which may differ from run to run and round differently. Called at the start of
    the commands that promise bitwise-repeatable results (see the module docstring).
    """
    import torch

    torch.backends.cudnn.benchmark = False


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 64 << 20          # blocks below 64 MiB come from the heap and are reused
TRIM_THRESHOLD = 256 << 20         # up to 256 MiB of free heap top is kept, not returned


def keep_freed_memory() -> bool:
    """Host memory: let glibc's malloc reuse the blocks torch frees on the CPU instead of
    returning them to the kernel and faulting fresh zeroed pages in on the next step.
    Returns whether it applied (Linux with glibc only; elsewhere it does nothing).

    By default glibc maps every block above its mmap threshold (128 KiB, raised on each
    free up to 32 MiB) straight from the kernel, unmaps it on free, and trims the heap's
    free top above twice that. A training step frees and re-allocates the same tensors
    (gradients with set_to_none, activations), so each step pays page faults again: a
    resnet34 step at batch 16 and 48 px on the 2-core AVX-512 machine took 8,900 minor
    faults and 92 ms, with these two thresholds 44 faults and 84 ms (the same at 1 and
    2 GiB, with which the whole `meddap demo` took 97.5 s against 101.5 s). Arithmetic is
    untouched (same kernels, same results), only where freed memory goes. The cost is at
    most TRIM_THRESHOLD of free memory held by the process. Setting either threshold turns
    glibc's dynamic adjustment off, so both are set. Called once at the start of every
    `meddap` command."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
