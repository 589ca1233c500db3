"""meddap.device: the one device rule and the one dtype rule."""
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
