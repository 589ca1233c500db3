"""scripts/estimate_memory.py: the live-storage tracker against hand counts, and the --quick report."""
import importlib.util
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "estimate_memory.py"
_spec = importlib.util.spec_from_file_location("estimate_memory", SCRIPT)
estimate_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(estimate_memory)
LiveMemory, fused_attention = estimate_memory.LiveMemory, estimate_memory.fused_attention

F32 = 4
META = "meta"


def test_a_chain_of_matmuls_peaks_at_the_hand_count():
    with LiveMemory(META, block=1) as mem:
        x = torch.empty(64, 32, device=META)          # 64·32·4  =  8192
        w1 = torch.empty(32, 128, device=META)        # 32·128·4 = 16384
        w2 = torch.empty(128, 16, device=META)        # 128·16·4 =  8192
        assert mem.live == (64 * 32 + 32 * 128 + 128 * 16) * F32 == 32768
        h = x @ w1                                    # 64·128·4 = 32768
        y = h @ w2                                    # 64·16·4  =  4096
        views = (x.view(-1), x.t(), y[:8])             # views share their storage: counted once
        assert mem.live == mem.peak == 32768 + 32768 + 4096
        del views
        del h
        assert mem.live == 32768 + 4096 and mem.peak == 69632
        with mem.window() as inner:
            z = y @ torch.empty(16, 16, device=META)  # 1024 weight + 4096 result
            del z
        assert inner == {"start": 36864, "peak": 36864 + 1024 + 4096, "largest": 4096, "end": 36864}
        assert mem.peak == 69632                      # the window's smaller peak leaves the outer one
    del x, w1, w2, y
    assert mem.live == 0


def test_tensors_saved_for_backward_stay_counted_until_the_backward_frees_them():
    with LiveMemory(META, block=1) as mem:
        x = torch.empty(64, 32, device=META)                          # 8192, no gradient
        w = torch.empty(32, 128, device=META, requires_grad=True)    # 16384
        h = x @ w                                                     # 32768: x is saved for dW, h is not
        r = h.relu()                                                  # 32768: relu saves its result
        loss = r.sum()                                                # 4
        del h, r
        assert mem.live == 8192 + 16384 + 32768 + 4                   # h freed, r held by autograd
        loss.backward()
        del loss
        assert w.grad.shape == w.shape
        assert mem.live == 8192 + 16384 + 16384                       # r freed, w.grad made


def test_blocks_are_rounded_up_as_the_cuda_caching_allocator_does():
    with LiveMemory(META) as mem:
        a = torch.empty(3, device=META)              # 12 bytes -> one 512-byte block
        b = torch.empty(129, device=META)            # 516 bytes -> two blocks
        assert mem.live == 512 + 1024
    del a, b


@pytest.mark.parametrize("dtype, kernel_bytes", [
    # flash: output (fp16) + log-sum-exp (fp32) + philox seed (2 x uint64) and offset (uint64)
    (torch.float16, 1024 * 64 * 2 + 1024 * F32 + 16 + 8),
    # memory-efficient, no gradient: the output + philox seed and offset (int64 each), no log-sum-exp
    (torch.float32, 1024 * 64 * F32 + 8 + 8),
])
def test_fused_attention_never_forms_the_attention_matrix(dtype, kernel_bytes):
    q = torch.empty(1, 1, 1024, 64, device=META, dtype=dtype)        # (B, heads, T, d)
    with LiveMemory(META, block=1) as mem, fused_attention():
        with mem.window() as fused:
            out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.dtype == dtype
    assert fused["peak"] - fused["start"] == kernel_bytes
    with LiveMemory(META, block=1) as mem:                            # torch's math kernel on meta
        with mem.window() as math:
            F.scaled_dot_product_attention(q, q, q)
    assert math["peak"] - math["start"] >= 1024 * 1024 * dtype.itemsize   # softmax(QK^T): T x T


def test_fits_applies_the_stated_margin():
    gib = estimate_memory.GiB
    limit = (8 * gib - estimate_memory.MARGIN_BYTES) / (1 + estimate_memory.MARGIN_FRACTION)
    assert estimate_memory.fits(int(limit), 8) and not estimate_memory.fits(int(limit) + 1, 8)


def test_quick_report_runs_end_to_end():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["config"] == "tiny" and report["quick"] is True and report["computed_not_measured"]
    assert set(report) >= {"margin", "cards_gib", "stages", "targets", "table", "cuda_context_bytes"}
    assert set(report["stages"]) == {
        "lora_64_fp16", "lora_64_fp32",
        "generate_64_b1_fp16", "generate_64_b1_fp32", "generate_64_b2_fp16", "generate_64_b2_fp32",
        "classify_resnet34_64_b2_fp16", "classify_squeezenet1.1_64_b2_fp16", "classify_densenet121_64_b2_fp16"}
    for name, stage in report["stages"].items():
        assert stage["bytes"] > stage["weights_bytes"] > 0, name
        assert stage["gib"] == round(stage["bytes"] / 2**30, 3) and stage["counted"], name
        if name.startswith("generate"):
            assert set(stage["by_card"]) == {str(c) for c in report["cards_gib"]}
            batch = int(name.split("_b")[1].split("_")[0])
            assert all(c["slice_size"] == batch for c in stage["by_card"].values())   # tiny: all fit
    assert report["table"].count("\n") == 2 + len(report["stages"])
    # CPU time, not wall time: the test machine's cores are shared (it took 17 s of CPU on 2 cores).
    assert cpu_seconds < 60, f"--quick took {cpu_seconds:.0f} s of CPU time"
