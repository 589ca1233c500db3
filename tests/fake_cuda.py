"""A fake CUDA device for tests on machines without a GPU, and a host<->device traffic counter.

Usage:

    from fake_cuda import fake_cuda

    with fake_cuda() as fc:                       # or fake_cuda(dtype=torch.float16)
        with torch.device("cuda"):
            unet = UNetModel(TINY.unet)           # parameters are fake CUDA tensors
        eps = unet(x_cuda, torch.tensor(500), context_cuda)
    assert fc.syncs == Counter({("cpu->cuda", "meddap/models/unet.py:344"): 1})

What it is: torch's `FakeTensorMode` (torch._subclasses.fake_tensor). Inside
it, tensors on "cuda" are fake: they carry shape, dtype and device but no
data, and every operator runs its meta kernel. The fake mode applies the
device rules of a real GPU run: an operator that meets a CPU tensor and a
CUDA tensor raises "Expected all tensors to be on the same device", except
for 0-d CPU tensors, which CUDA kernels accept as scalars.

Tensors that never touch CUDA stay real: an operator whose inputs are all
real tensors and that names no CUDA device runs for real on the CPU, so
tokenizers, schedules and `.item()` on CPU values work as usual.

What it counts, in `fc.syncs`, a Counter of (kind, where):
  "cpu->cuda"  an `aten._to_copy` or `aten.copy_` from the CPU to CUDA
  "cuda->cpu"  the same the other way; on a GPU it waits for the device
  "item"       `aten._local_scalar_dense` of a CUDA tensor: .item(), int(),
               float(), bool(), `if cuda_tensor:`; on a GPU it waits for the
               device. A fake tensor has no value, so after counting it this
               raises FakeCudaValueError naming the line.
`where` is "meddap/<file>.py:<line>", the innermost frame of the Python
stack inside the meddap package (the line of meddap code that issued the
call, through torch), or "outside meddap".

`fc.reset()` empties the counter (e.g. after building the inputs).
`line_of(path, text)` gives the "meddap/...:N" of the one line containing
text, so expectations name a line by its code rather than its number.

Patched only while the context is open: `torch.cuda.mem_get_info` answers
(free_bytes, total_bytes) as given to `fake_cuda`, for code that sizes work
by the free device memory. `torch.cuda.is_available()` stays False: build
and move modules with explicit devices. `cuda_autocast(dtype)` is the
`torch.autocast("cuda", dtype)` context that meddap code opens on a GPU
(torch.autocast turns itself off when is_available() is False).
Backward does not run here (the autograd engine asks the driver for the
device's context); run a backward on the `meta` device instead.
Not covered: operators with data-dependent output shapes (nonzero, boolean
masks) raise torch's DynamicOutputShapeException under the fake mode.
"""
from __future__ import annotations

import contextlib
import sys
from unittest import mock
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

import meddap

MEDDAP_DIR = Path(meddap.__file__).resolve().parent
REPO_ROOT = MEDDAP_DIR.parent
OUTSIDE = "outside meddap"

_aten = torch.ops.aten
_TO_COPY = _aten._to_copy.default
_COPY_ = _aten.copy_.default
_ITEM = _aten._local_scalar_dense.default


class FakeCudaValueError(RuntimeError):
    """A fake CUDA tensor was asked for a Python value (.item(), int(), bool())."""


def line_of(path: str, text: str) -> str:
    """"meddap/models/unet.py:344" for the one line of `path` (relative to the repository) containing `text`."""
    lines = (REPO_ROOT / path).read_text().splitlines()
    hits = [n for n, line in enumerate(lines, start=1) if text in line]
    if len(hits) != 1:
        raise AssertionError(f"{path}: {len(hits)} lines contain {text!r}; expected exactly one.")
    return f"{path}:{hits[0]}"


def issuing_line() -> str:
    """The innermost frame of the current Python stack inside meddap/, as "meddap/<file>.py:<line>"."""
    frame = sys._getframe(1)
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if file.is_relative_to(MEDDAP_DIR):
            return f"{file.relative_to(REPO_ROOT).as_posix()}:{frame.f_lineno}"
        frame = frame.f_back
    return OUTSIDE


def _device_type(x: object) -> str | None:
    return x.device.type if isinstance(x, torch.Tensor) else None


def _is_view(func) -> bool:
    """An operator whose result aliases its input without writing it (view, expand, t, ...):
    metadata only, no kernel."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _Recorder(TorchDispatchMode):
    """Sits above the fake mode: counts traffic, and runs all-real CPU operators for real."""

    def __init__(self, syncs: Counter, kernels: Counter | None = None):
        super().__init__()
        self.syncs = syncs
        self.kernels = kernels if kernels is not None else Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self.syncs[(kind, issuing_line())] += 1
        names_cuda = any(isinstance(x, torch.device) and x.type == "cuda" for x in leaves)
        if not names_cuda and not any(isinstance(x, FakeTensor) for x in leaves):
            with _disable_current_modes():
                return func(*args, **kwargs)           # a real CPU operator
        if not _is_view(func):
            self.kernels[func.__name__] += 1           # a CUDA operator that would launch a kernel
        if kind == "item":
            raise FakeCudaValueError(f"{issuing_line()}: .item(), int(), float() or bool() of a CUDA tensor has "
                                     "no value under fake_cuda; on a GPU it would wait for the device.")
        return func(*args, **kwargs)                   # on to the fake mode

    @staticmethod
    def _kind(func, args, kwargs) -> str | None:
        if func is _TO_COPY:
            src = _device_type(args[0])
            dst = kwargs["device"].type if kwargs.get("device") is not None else src
        elif func is _COPY_:
            dst, src = _device_type(args[0]), _device_type(args[1])
        elif func is _ITEM:
            return "item" if _device_type(args[0]) == "cuda" else None
        else:
            return None
        return f"{src}->{dst}" if {src, dst} == {"cpu", "cuda"} else None


class FakeCuda:
    """What `fake_cuda` yields: `syncs` (Counter of (kind, where)), `reset()`, `device`."""

    def __init__(self) -> None:
        self.syncs: Counter[tuple[str, str]] = Counter()
        self.kernels: Counter[str] = Counter()     # CUDA operators that launch a kernel, by name
        self.device = torch.device("cuda", 0)

    def reset(self) -> None:
        self.syncs.clear()
        self.kernels.clear()


@contextlib.contextmanager
def fake_cuda(dtype: torch.dtype = torch.float32, free_bytes: int = 64 * 2**30,
              total_bytes: int = 80 * 2**30) -> Iterator[FakeCuda]:
    """Open a fake CUDA device with `dtype` as torch's default dtype; both are undone on exit."""
    fc = FakeCuda()
    previous_dtype = torch.get_default_dtype()
    previous_mem_get_info = torch.cuda.mem_get_info
    torch.set_default_dtype(dtype)
    torch.cuda.mem_get_info = lambda device=None: (free_bytes, total_bytes)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _Recorder(fc.syncs, fc.kernels):
            yield fc
    finally:
        torch.cuda.mem_get_info = previous_mem_get_info
        torch.set_default_dtype(previous_dtype)


def cuda_autocast(dtype: torch.dtype = torch.float16) -> torch.autocast:
    """torch.autocast("cuda", dtype), enabled although no driver is loaded (is_available()
    is patched to True while the context object is built, and only then)."""
    with mock.patch("torch.cuda.is_available", return_value=True):
        return torch.autocast("cuda", dtype=dtype)
