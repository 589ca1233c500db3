"""Checkpoint reading: safety, strictness, model families, bad input, inspect-checkpoint."""
import json
import os
import re
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.models.checkpoint import PREFIXES, read_safetensors, read_state_dict, write_safetensors
from meddap.models.stable_diffusion import checkpoint_state_dict, load_stable_diffusion
from sd_files import POSITION_IDS, random_state_dict, save_ckpt, write_random_checkpoint

UNET_KEY = PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state_dict("tiny", optional=True)


def assert_loaded_equal(model, state_dict, dtype=torch.float32):
    got = checkpoint_state_dict(model)
    assert all(torch.equal(got[k], state_dict[k].to(dtype)) for k in got)


# ---- formats -------------------------------------------------------------------------
def test_safetensors_reader_matches_safetensors_library(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(77)[None], "scalar": torch.tensor(0.5), "empty": torch.zeros(0, 3),
               "odd": torch.arange(3, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "lib.safetensors")
    ours = read_state_dict(tmp_path / "lib.safetensors")
    assert ours.keys() == tensors.keys()
    assert all(torch.equal(ours[k], tensors[k]) and ours[k].dtype == tensors[k].dtype for k in tensors)
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"note": "x"})
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # atomic: no temp left


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that NaN, -0.0 and inf compare bit for bit."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def oracle_tensors() -> dict[str, torch.Tensor]:
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-42, 65504.0, 3.0e38])
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.cat([torch.randn(5, generator=g), special]).reshape(3, 4),
            "f16": torch.cat([torch.randn(9, generator=g), special]).half().reshape(4, 4),
            "bf16": torch.cat([torch.randn(2, generator=g), special]).bfloat16().reshape(1, 9),
            "empty": torch.zeros(2, 0, 3), "empty_f16": torch.zeros(0, dtype=torch.float16)}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k].dtype, got[k].shape) == (want[k].dtype, want[k].shape), k
        assert torch.equal(bits(got[k]), bits(want[k])), k


def test_our_codec_and_the_safetensors_library_read_each_others_files(tmp_path):
    tensors, metadata = oracle_tensors(), {"meddap_rank": "4", "format": "pt", "empty": "", "ü": "∆W"}
    # ours -> the library
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == metadata
        assert_same_tensors({k: f.get_tensor(k) for k in f.keys()}, tensors)
    # the library -> ours
    save_file(tensors, tmp_path / "lib.safetensors", metadata=metadata)
    got, got_metadata = read_safetensors(tmp_path / "lib.safetensors")
    assert got_metadata == metadata
    assert_same_tensors(got, tensors)
    # no metadata written: none read, by either
    write_safetensors(tmp_path / "bare.safetensors", tensors)
    with safe_open(tmp_path / "bare.safetensors", "pt") as f:
        assert f.metadata() is None
    assert read_safetensors(tmp_path / "bare.safetensors")[1] == {}
    save_file(tensors, tmp_path / "lib_bare.safetensors")
    assert read_safetensors(tmp_path / "lib_bare.safetensors")[1] == {}


def test_read_safetensors_copies_tensors_out_of_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"w": torch.arange(6.0)})
    tensors, _ = read_safetensors(path)
    with open(path, "r+b") as f:                    # overwrite the data in place, same size
        f.seek(path.stat().st_size - 24)
        f.write(torch.full((6,), -1.0).numpy().tobytes())
    assert torch.equal(tensors["w"], torch.arange(6.0))
    tensors["w"] += 1                               # an ordinary, writable tensor
    assert torch.equal(read_safetensors(path)[0]["w"], torch.full((6,), -1.0))


@pytest.mark.parametrize("metadata", ['[1, 2]', '"pt"', '{"rank": 4}', '{"a": null}', '{"a": {"b": "c"}}'])
def test_metadata_that_is_not_strings_is_refused(tmp_path, metadata):
    header = ('{"__metadata__": ' + metadata + ', "w": {"dtype": "F32", "shape": [1], '
              '"data_offsets": [0, 4]}}').encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    message = rf"m\.safetensors: the header's __metadata__ is not an object of strings \({re.escape(repr(json.loads(metadata)))}\); "
    for read in (read_safetensors, read_state_dict):
        with pytest.raises(MeddapError, match=message):
            read(path)


def test_writer_names_a_dtype_it_cannot_store(tmp_path):
    with pytest.raises(MeddapError, match=r"c\.safetensors: tensor z has dtype torch\.complex64; "
                                          r"safetensors files hold torch\.float64, torch\.float32"):
        write_safetensors(tmp_path / "c.safetensors", {"ok": torch.zeros(1), "z": torch.zeros(2, dtype=torch.cfloat)})
    assert list(tmp_path.iterdir()) == []           # nothing written


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_tiny_file_loads_strictly_in_each_dtype(tmp_path, tiny_sd, fmt):
    path = write_random_checkpoint(tmp_path / f"sd.{fmt}", fmt=fmt, optional=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")              # equal schedule: no warning
            model = load_stable_diffusion(path, dtype=dtype)
        assert model.config.name == "tiny" and model.dtype == dtype
        assert_loaded_equal(model, tiny_sd, dtype)
    assert not any(p.is_meta for p in model.parameters())


def test_nested_and_flat_pickles(tmp_path, tiny_sd):
    required = {k: v for k, v in tiny_sd.items() if k.startswith(tuple(PREFIXES.values()))}
    torch.save(required, tmp_path / "flat.pt")
    torch.save({"state_dict": {"state_dict": required}}, tmp_path / "nested.ckpt")
    for name in ("flat.pt", "nested.ckpt"):
        assert_loaded_equal(load_stable_diffusion(tmp_path / name), tiny_sd)


# ---- safety ----------------------------------------------------------------------------
@pytest.mark.parametrize("zip_format", [True, False])
def test_legacy_ckpt_with_pickled_lightning_class_loads(tmp_path, tiny_sd, zip_format):
    path = save_ckpt(tmp_path / "legacy.ckpt", tiny_sd, lightning=True, zip_format=zip_format)
    assert "pytorch_lightning" not in sys.modules
    if zip_format:
        assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in \
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    model = load_stable_diffusion(path)
    assert_loaded_equal(model, tiny_sd)
    assert "pytorch_lightning" not in sys.modules       # never imported


class RunsACommand:
    """Unpickling this calls os.system (the classic malicious-pickle payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_would_run_a_command_is_refused(tmp_path, tiny_sd, zip_format):
    marker = tmp_path / "PWNED"
    obj = {"state_dict": tiny_sd, "payload": RunsACommand(marker)}
    torch.save(obj, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(MeddapError, match=r"evil\.ckpt: refused: .*system"):
        load_stable_diffusion(tmp_path / "evil.ckpt")
    assert main(["inspect-checkpoint", str(tmp_path / "evil.ckpt")]) == 2
    assert not marker.exists()


# ---- bad input ---------------------------------------------------------------------------
def test_truncated_files(tmp_path):
    for fmt in ("safetensors", "ckpt"):
        full = write_random_checkpoint(tmp_path / f"full.{fmt}", fmt=fmt).read_bytes()
        for cut in (len(full) // 2, 100):
            (tmp_path / f"cut.{fmt}").write_bytes(full[:cut])
            with pytest.raises(MeddapError, match=rf"cut\.{fmt}: .*truncated"):
                load_stable_diffusion(tmp_path / f"cut.{fmt}")


def test_not_sd_files(tmp_path, reference_dir):
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(MeddapError, match=r"text\.ckpt: .*not a torch checkpoint"):
        load_stable_diffusion(tmp_path / "text.ckpt")
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(MeddapError, match=r"other\.safetensors: not a Stable Diffusion v1 checkpoint"):
        load_stable_diffusion(tmp_path / "other.safetensors")
    lora = reference_dir / "meddap_authors_lora_r4.safetensors"
    with pytest.raises(MeddapError, match=r"LoRA adapter.*load_lora"):
        load_stable_diffusion(lora)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(MeddapError, match=r"unknown checkpoint type '\.onnx'"):
        load_stable_diffusion(tmp_path / "model.onnx")
    with pytest.raises(MeddapError, match=r"does not exist"):
        load_stable_diffusion(tmp_path / "absent.ckpt")


def test_sd2_and_sdxl_are_named(tmp_path, tiny_sd):
    sd2 = dict(tiny_sd)
    sd2["cond_stage_model.model.token_embedding.weight"] = torch.zeros(4, 4)
    write_safetensors(tmp_path / "sd2.safetensors", sd2)
    with pytest.raises(MeddapError, match=r"sd2\.safetensors: .*Stable Diffusion 2\.x"):
        load_stable_diffusion(tmp_path / "sd2.safetensors")
    wide = {k: v for k, v in tiny_sd.items() if not k.startswith("cond_stage_model.")}
    wide[UNET_KEY] = torch.zeros(64, 1024)                  # 1024-wide context, SD 2's
    write_safetensors(tmp_path / "sd2b.safetensors", wide)
    with pytest.raises(MeddapError, match=r"1024-wide context"):
        load_stable_diffusion(tmp_path / "sd2b.safetensors")
    xl = dict(tiny_sd)
    xl["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    write_safetensors(tmp_path / "xl.safetensors", xl)
    with pytest.raises(MeddapError, match=r"xl\.safetensors: this is an SDXL checkpoint"):
        load_stable_diffusion(tmp_path / "xl.safetensors")


@pytest.mark.parametrize("dtype", [torch.int8, "fp8", torch.float64, "float"])
def test_wrong_dtype_request(tmp_path, dtype):
    path = write_random_checkpoint(tmp_path / "sd.safetensors")
    with pytest.raises(MeddapError, match=r"sd\.safetensors: dtype .* is not supported.*float32, float16 or bfloat16"):
        load_stable_diffusion(path, dtype=dtype)


def test_missing_mismatched_and_unexpected_keys(tmp_path, tiny_sd):
    vae_key = PREFIXES["vae"] + "decoder.up.0.block.1.conv2.weight"
    text_key = PREFIXES["text_encoder"] + "encoder.layers.1.mlp.fc2.bias"
    write_random_checkpoint(tmp_path / "a.safetensors", drop=(vae_key,))
    with pytest.raises(MeddapError, match=rf"the vae is incomplete: 1 tensors are missing, first \['{vae_key}'\]"):
        load_stable_diffusion(tmp_path / "a.safetensors")
    write_random_checkpoint(tmp_path / "b.safetensors", extra={text_key: torch.zeros(3)})
    with pytest.raises(MeddapError, match=rf"the text_encoder has tensors of the wrong shape.*{text_key}: file \[3\]"):
        load_stable_diffusion(tmp_path / "b.safetensors")
    write_random_checkpoint(tmp_path / "c.safetensors", extra={"model.diffusion_model.extra.weight": torch.zeros(1)})
    with pytest.raises(MeddapError, match=r"1 unexpected tensors, first \['model.diffusion_model.extra.weight'\]"):
        load_stable_diffusion(tmp_path / "c.safetensors")


def test_optional_keys_and_ema_copies_are_accepted(tmp_path, tiny_sd):
    ema = {"model_ema.diffusion_modelinput_blocks00weight": torch.zeros(32, 4, 3, 3)}
    path = write_random_checkpoint(tmp_path / "ema.ckpt", fmt="ckpt", optional=True, extra=ema)
    assert_loaded_equal(load_stable_diffusion(path), tiny_sd)
    path = write_random_checkpoint(tmp_path / "bare.safetensors", drop=())   # no optional keys at all
    assert POSITION_IDS not in read_state_dict(path)
    assert_loaded_equal(load_stable_diffusion(path), tiny_sd)


def test_schedule_difference_is_reported(tmp_path, tiny_sd, capsys):
    from meddap.sampling.schedule import sd_checkpoint_buffers
    betas = sd_checkpoint_buffers()["betas"] * 1.01
    path = write_random_checkpoint(tmp_path / "s.safetensors", optional=True, extra={"betas": betas})
    with pytest.warns(UserWarning, match=r"schedule buffer betas: relative difference up to 0\.01"):
        load_stable_diffusion(path)
    assert main(["inspect-checkpoint", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedule"]["buffers_present"] == 12
    assert report["schedule"]["differences"] == ["betas: relative difference up to 0.01 from meddap's schedule"]


# ---- inspect-checkpoint ----------------------------------------------------------------
def test_inspect_checkpoint_json(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "sd.ckpt", fmt="ckpt", optional=True, dtype=torch.float16)
    assert main(["inspect-checkpoint", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"unet", "vae", "text_encoder", "missing", "unexpected", "optional"} <= r.keys()
    sd = random_state_dict("tiny")
    for component, prefix in PREFIXES.items():
        expected = sum(v.numel() for k, v in sd.items() if k.startswith(prefix))
        assert r[component]["parameters"] == expected and r[component]["dtypes"] == ["float16"]
    assert r["config"] == "tiny" and r["missing"] == r["unexpected"] == [] and len(r["optional"]) == 16
    assert r["schedule"]["differences"] == []


def test_inspect_checkpoint_reports_broken_files(tmp_path, capsys):
    key = PREFIXES["unet"] + "out.2.bias"
    path = write_random_checkpoint(tmp_path / "sd.safetensors", drop=(key,), extra={"junk": torch.zeros(1)})
    assert main(["inspect-checkpoint", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"missing: 1  first: {key}" in out and "unexpected: 1  first: junk" in out
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["inspect-checkpoint", str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.safetensors: the safetensors header is not valid JSON" in capsys.readouterr().err
