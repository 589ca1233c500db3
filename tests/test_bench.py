"""`meddap bench`: the JSON it prints, its timing rule and its protocol formula."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from meddap import bench

PATH_NAMES = ["train_lora_224", "train_lora_224_fast", "train_lora_512_fast", "train_lora_224_5folds",
              "pndm30_b1_512", "ddim50_b8_512", "classify_resnet34_224", "fid_features"]
STAGES = {"lora_training", "generation", "classifier_training", "fid_features", "total"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meddap")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_quick_json_on_tiny_cpu(capsys):
    args = _parse(["--quick", "--json", "--device", "cpu", "--model", "tiny"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"device", "torch", "paths", "protocol_hours"}
    assert result["device"] == "cpu"
    assert list(result["paths"]) == PATH_NAMES
    for name, entry in result["paths"].items():
        assert set(entry) == {"meddap", "baseline", "ratio", "baseline_note"}, name
        assert entry["baseline"] is None and entry["ratio"] is None and entry["baseline_note"] is None
        m = entry["meddap"]
        assert set(m) == {"per_s", "unit", "peak_gib", "peak", "median_s", "size", "batch", "fast", "note"}
        assert m["per_s"] > 0 and m["median_s"] > 0, name
        # A maximum RSS minus the RSS at the start: at least 0 (the models are resident).
        assert m["peak_gib"] >= 0 and m["peak"] in ("rss_max_minus_start", "rss_max_since_bench_start")
        assert m["fast"] is False          # no fast variant exists in meddap yet
    sizes = {name: e["meddap"]["size"] for name, e in result["paths"].items()}
    assert sizes == {"train_lora_224": 64, "train_lora_224_fast": 64, "train_lora_512_fast": 128,
                     "train_lora_224_5folds": 64, "pndm30_b1_512": 64, "ddim50_b8_512": 64,
                     "classify_resnet34_224": 64, "fid_features": 299}
    assert result["paths"]["train_lora_224_5folds"]["meddap"]["unit"] == "fold-steps"
    hours = result["protocol_hours"]
    assert set(hours) == STAGES and all(h > 0 for h in hours.values())
    assert hours["total"] == pytest.approx(sum(h for k, h in hours.items() if k != "total"), rel=1e-12)


def test_measure_takes_the_median_after_one_warm_up(monkeypatch):
    calls = []
    work = bench.Work(step=lambda: calls.append(1), items=6, unit="images", size=8, batch=6,
                      fast=False, note="")
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])      # timed calls of 1, 3 and 2 seconds
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    import torch
    m = bench.measure(work, torch.device("cpu"), repeats=3, rss_start=0)
    assert len(calls) == 4                                 # 1 warm-up + 3 timed
    assert m["median_s"] == 2.0 and m["per_s"] == 3.0      # 6 images / median 2 s


def test_protocol_hours_formula():
    rates = {"train_lora_224": 2.0, "train_lora_224_fast": 5.0, "train_lora_512_fast": 100.0,
             "train_lora_224_5folds": 4.0, "pndm30_b1_512": 0.5, "ddim50_b8_512": 100.0,
             "classify_resnet34_224": 1000.0, "fid_features": 50.0}
    hours = bench.protocol_hours({n: {"meddap": {"per_s": r}} for n, r in rates.items()})
    assert hours["lora_training"] == pytest.approx(5 * 54_500 / 5.0 / 3600)   # the fastest 224 px path
    assert hours["generation"] == pytest.approx(54_500 / 0.5 / 3600)
    assert hours["classifier_training"] == pytest.approx(450 * 100 * 1_090 / 1000.0 / 3600)
    assert hours["fid_features"] == pytest.approx((54_500 + 5 * 545) / 50.0 / 3600)
    assert hours["total"] == pytest.approx(sum(v for k, v in hours.items() if k != "total"))


def test_baseline_notes_where_there_is_none():
    # bench and work are not touched on these branches.
    assert bench._baselines().baseline_work("classify_resnet34_224", None, None) == \
        (None, "no diffusers equivalent: meddap trains torchvision's network itself")
    if importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("peft") is None:
        assert bench._baselines().baseline_work("train_lora_224", None, None) == \
            (None, "peft is not installed; diffusers' LoRA training needs it")


def test_bad_settings_are_sentences():
    from meddap.errors import MeddapError
    with pytest.raises(MeddapError, match=r"^--model = 'sd-v2' is not a model config; choose one of "
                                          r"sd-v1.4, tiny\.$"):
        bench.from_args(bench.BenchConfig, _parse(["--model", "sd-v2"]))
    with pytest.raises(MeddapError, match=r"^--repeats = 0 must be at least 1\.$"):
        bench.from_args(bench.BenchConfig, _parse(["--repeats", "0"]))


def test_half_precision_needs_cuda():
    from meddap.errors import MeddapError
    with pytest.raises(MeddapError, match=r"^--dtype fp16 needs a CUDA device \(train-lora's mixed precision "
                                          r"does\); on cpu the bench runs in fp32 \(--dtype fp32\)\.$"):
        bench.bench(bench.BenchConfig(device="cpu", dtype="fp16", model="tiny"))
