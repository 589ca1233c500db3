"""meddap.device: the one device rule and the one dtype rule."""
import platform
import subprocess
import sys

import pytest
import torch

from meddap.device import check_device_name, resolve_device, resolve_dtype
from meddap.errors import MeddapError


def test_auto_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["bogus", "cuda:", "gpu", "cuda:x", "", 3])
def test_bad_names_are_refused_without_torch(name):
    assert (check_device_name(name) is not None) == (name != "")


def test_bad_and_unavailable_devices_are_sentences(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MeddapError, match=r"^--device 'bogus' is not a device; use cpu, cuda or cuda:N\.$"):
        resolve_device("bogus")
    with pytest.raises(MeddapError, match=r"--device cuda:1: no CUDA GPU is usable here"):
        resolve_device("cuda:1")


def test_bare_cuda_under_torchrun_is_the_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device(None) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)          # an explicit index wins
    assert chosen == [torch.device("cuda", 3)] * 2 + [torch.device("cuda", 1)]
    with pytest.raises(MeddapError, match="has 4 GPU"):
        resolve_device("cuda:7")


def test_dtypes(monkeypatch):
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(MeddapError, match=r"--dtype 'half' is not a dtype; choose one of fp32, fp16, bf16"):
        resolve_dtype("half")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(MeddapError, match="Tesla T4 has no bfloat16 support"):
        resolve_dtype("bf16", "cuda:0")


_CHURN = """
import resource, sys
import numpy as np
from meddap.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for i in range(21):                                  # 40 MB blocks: above glibc's 32 MiB dynamic cap
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(5_000_000)
    del a
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory acts on glibc's malloc only")
def test_keep_freed_memory_reuses_freed_blocks():
    """A 40 MB block allocated and freed 20 times: glibc's default maps and unmaps it each
    time, so every pass faults its pages in again (11,360 faults in all on the 2-core dev
    machine, numpy asking for huge pages); after keep_freed_memory it is reused (0)."""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["keep"][0] == "True"
    assert runs["default"][1] >= 20 * 2                      # the baseline does churn on this machine
    assert runs["keep"][1] < runs["default"][1] / 10, runs
