"""scripts/gpu_check.py: its CPU run end to end (one JSON report, exit 0), and its record rules."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
SECTIONS = {"parity", "fid_features", "lora_training", "generation", "classifiers", "torchrun", "diffusers"}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    # One thread per process: on a busy 2-core machine spinning OpenMP threads slow the run many times.
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(done.stdout)                    # exactly one JSON object on stdout


def test_the_cpu_quick_run_reports_every_section_ok(report):
    assert set(report) == {"ok", "device", "gpu", "torch", "cuda", "quick", "config", "sizes",
                           "tolerances", "seconds", "sections"}
    assert (report["ok"], report["device"], report["gpu"], report["quick"], report["config"]) == \
        (True, "cpu", None, True, "tiny")
    assert set(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["ok"] and section["failures"] == [] and "error" not in section, name
        assert {"ok", "seconds", "failures", "notes"} <= set(section), name


def test_the_cpu_quick_run_measures_what_it_claims(report):
    parity, fid = report["sections"]["parity"], report["sections"]["fid_features"]
    # The "device" is the CPU: the same kernels on a copy of the same weights, bit for bit.
    assert [parity[f"{part}_fp32_rel_err"] for part in ("unet", "vae_encode", "vae_decode", "text_encoder")] \
        == [0.0] * 4
    assert fid["standard_tf32_off_rel_err"] == fid["as_released_tf32_off_rel_err"] == 0.0
    assert "standard_tf32_on_rel_err" not in fid                   # no TF32 on the CPU
    lora = report["sections"]["lora_training"]
    assert len(lora["fp32_losses"]) == report["sizes"]["lora_steps"] == 2 and lora["fp32_skipped_steps"] == 0
    assert "fp16_losses" not in lora and any("mixed precision needs CUDA" in n for n in lora["notes"])
    generation = report["sections"]["generation"]
    assert generation["unet_calls"] == report["sizes"]["gen_steps"] + 1       # PLMS: n + 1 calls
    assert generation["max_memory_allocated_bytes"] is None
    assert set(report["sections"]["classifiers"]) >= {f"{a}_losses" for a in
                                                      ("resnet34", "squeezenet1.1", "densenet121")}
    torchrun = report["sections"]["torchrun"]
    assert (torchrun["returncode"], torchrun["files"]) == (0, 6)
    diffusers = report["sections"]["diffusers"]
    if not diffusers.get("skipped"):
        assert max(diffusers[k] for k in ("unet_rel_err", "vae_encode_rel_err", "vae_decode_rel_err")) <= 1e-4


def test_a_section_that_raises_is_recorded_and_a_bound_names_the_value():
    gpu_check = load_script()
    check = gpu_check.Check(torch.device("cpu"), gpu_check.CPU_SIZES, Path("."))
    record = gpu_check.run_section(lambda c: 1 / 0, check)
    assert (record["ok"], record["error"]) == (False, "ZeroDivisionError: division by zero")
    section = gpu_check.Section()
    section.bound("unet_fp16_rel_err", 0.25, 0.05)
    section.bound("unet_fp32_rel_err", float("nan"), 1e-4)
    section.bound("vae_fp32_rel_err", 1e-5, 1e-4)
    assert section["failures"] == ["unet_fp16_rel_err = 0.25 is not at most 0.05",
                                   "unet_fp32_rel_err = nan is not at most 0.0001"]
    assert gpu_check.run_section(lambda c: section, check)["ok"] is False
    assert gpu_check.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])) == 0.75
