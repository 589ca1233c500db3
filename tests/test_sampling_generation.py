"""The one generation path (meddap.sampling.generation): its config, its resume rule,
and `meddap sample` / `meddap expand` both going through it."""
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.io import read_jsonl, sha256_file, stream_seed
from meddap.models.stable_diffusion import build_stable_diffusion, save_stable_diffusion
from meddap.sampling import generation
from meddap.sampling.generation import (GenerationConfig, ImageJob, load_model, manifest_rows,
                                        write_images)
from meddap.sampling.samplers import Sampler
from meddap.sampling.text_to_image import (TextToImage, encode_prompts, generate, image_seed,
                                           read_png_metadata, write_png)
from meddap.settings import from_table

CFG = GenerationConfig(sampler=Sampler.DDIM, steps=1, height=16, width=16, batch_size=2)


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return build_stable_diffusion("tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd):
    """A tiny checkpoint and a two-image phantom data set."""
    from meddap.data.phantom import write_phantom
    root = tmp_path_factory.mktemp("generation")
    save_stable_diffusion(tiny_sd, root / "tiny.safetensors")
    write_phantom(root / "data", seed=0, size=64, counts={"benign": 1, "malignant": 1},
                  show_progress=False)
    return root


def _jobs(n=5):
    return [ImageJob(file=f"{k:05d}.png", prompt="benign tumor", seed=image_seed(3, k), meta={"index": k})
            for k in range(n)]


def _pngs(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _damage(path):
    """Same metadata, one pixel changed: a complete PNG whose bytes no longer hash to its line."""
    meta = read_png_metadata(path)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0, 0] ^= 0xFF
    write_png(path, Image.fromarray(pixels), meta)


# ---------------------------------------------------------------- one rule

def test_image_seed_is_the_one_stream_seed_rule():
    for base, k in ((0, 0), (4, 7), (2 ** 62, 3), (123456789, 10 ** 6)):
        assert image_seed(base, k) == stream_seed(base, k)


def test_resume_keeps_good_chunks_and_samples_bad_chunks_whole(tiny_sd, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    rows = write_images(tiny_sd, CFG, _jobs(), reference, quiet=True)
    assert list(rows) == [f"{k:05d}.png" for k in range(5)]
    assert rows["00001.png"]["sha256"] == sha256_file(reference / "00001.png")
    assert rows["00001.png"]["index"] == 1 and rows["00001.png"]["seed"] == image_seed(3, 1)

    out = tmp_path / "resumed"
    write_images(tiny_sd, CFG, _jobs(), out, quiet=True)
    _damage(out / "00002.png")                               # chunk 1 = jobs 2, 3
    (out / "00004.png").unlink()                             # chunk 2 = job 4
    manifest = out / "manifest.jsonl"
    lines = read_jsonl(manifest)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines[1:]))  # job 0: no line
    mtimes = {k: (out / f"{k:05d}.png").stat().st_mtime_ns for k in (0, 1, 3)}
    batches = []
    call = TextToImage.__call__
    monkeypatch.setattr(TextToImage, "__call__",
                        lambda self, prompts, seeds: batches.append(len(prompts)) or call(self, prompts, seeds))
    write_images(tiny_sd, CFG, _jobs(), out, quiet=True)
    assert batches == [2, 1]                                 # chunk 1 whole, then chunk 2
    assert _pngs(out) == _pngs(reference)                    # bitwise
    assert {k: (out / f"{k:05d}.png").stat().st_mtime_ns for k in (0, 1, 3)} == mtimes
    assert manifest_rows(out) == manifest_rows(reference)    # job 0's line adopted from its PNG


def test_other_settings_are_an_error_naming_file_setting_and_values(tiny_sd, tmp_path):
    write_images(tiny_sd, CFG, _jobs(2), tmp_path, quiet=True, extra_settings={"as_released": False})
    with pytest.raises(MeddapError) as e:
        write_images(tiny_sd, dataclasses.replace(CFG, guidance=3.0), _jobs(2), tmp_path, quiet=True,
                     extra_settings={"as_released": False})
    assert str(e.value) == (f"{tmp_path / '00000.png'} was made with other settings (guidance: 7.5, "
                            f"this run: 3.0); use another --out folder or delete it.")
    with pytest.raises(MeddapError, match=r"other settings \(as_released: False, this run: True\)"):
        write_images(tiny_sd, CFG, _jobs(2), tmp_path, quiet=True, extra_settings={"as_released": True})


def test_chunk_filter_selects_chunks_and_meta_may_not_shadow_settings(tiny_sd, tmp_path):
    rows = write_images(tiny_sd, CFG, _jobs(5), tmp_path, quiet=True, chunk_filter=lambda k: k % 2 == 0)
    assert list(rows) == ["00000.png", "00001.png", "00004.png"]
    assert sorted(_pngs(tmp_path)) == ["00000.png", "00001.png", "00004.png"]
    bad = [ImageJob(file="x.png", prompt="p", seed=0, meta={"seed": 1, "steps": 2})]
    with pytest.raises(ValueError, match="meta may not set seed, steps"):
        write_images(tiny_sd, CFG, bad, tmp_path / "bad", quiet=True)


def test_sample_and_expand_resume_by_the_same_function(files, tmp_path, monkeypatch):
    """Both commands call generation.write_images, and in both a damaged PNG (complete,
    same metadata, other bytes) is made again bitwise equal to the original."""
    calls = []
    real = generation.write_images
    monkeypatch.setattr(generation, "write_images", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    common = ["--checkpoint", str(files / "tiny.safetensors"), "--sampler", "ddim", "--steps", "1",
              "--height", "16", "--width", "16", "--batch-size", "2", "--quiet"]
    sample = ["sample", *common, "--prompt", "benign tumor", "--n", "3", "--out", str(tmp_path / "s")]
    expand = ["expand", *common, "--data", str(files / "data"), "--ratios", "1", "--adjectives", "none",
              "--out", str(tmp_path / "e")]
    for args, victim in ((sample, tmp_path / "s" / "00002.png"),
                         (expand, tmp_path / "e" / "no_adjective/ratio_1/train/malignant/syn_00000.png")):
        assert main(args) == 0
        before = victim.read_bytes()
        _damage(victim)
        assert victim.read_bytes() != before
        assert main(args) == 0
        assert victim.read_bytes() == before
    assert calls == ["meddap sample"] * 2 + ["expand"] * 2


# ---------------------------------------------------------------- the config, on the CLI and in TOML

def _help(command, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    return text[text.index("options:"):]


@pytest.mark.parametrize("command", ["sample", "expand"])
def test_help_shows_the_generation_defaults_and_the_sampler_enum(command, capsys):
    text = _help(command, capsys)
    assert "--sampler {" + ",".join(s.value for s in Sampler) + "}" in text
    for f in dataclasses.fields(GenerationConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = f.default.value if isinstance(f.default, Sampler) else f.default
        segment = text[re.search(re.escape(flag) + "[ ,]", text).start():]
        if shown in ("", None):                 # no "(default: )": the help text says what empty means
            assert not re.match(r"\S+ \S+ [^-]*\(default: \)", segment), flag
            continue
        assert re.search(r"\(default: ([^)]*)\)", segment).group(1) == str(shown), flag
    assert "(default: pndm)" in text and "(default: 7.5)" in text and "(default: 512)" in text


@pytest.mark.parametrize("command", ["sample", "expand"])
def test_sampler_choices_are_the_enum_values(command, capsys):
    args = [command, "--checkpoint", "x", "--out", "o", *({"sample": ["--prompt", "p"],
                                                            "expand": ["--data", "d"]}[command])]
    with pytest.raises(SystemExit) as e:
        main(args + ["--sampler", "euler"])
    assert e.value.code == 2
    assert re.search(r"argument --sampler: invalid choice: 'euler' \(choose from '?ddpm'?, '?ddim'?, '?pndm'?\)",
                     capsys.readouterr().err)


@pytest.mark.parametrize("extra,message", [
    (["--guidance", "-5"], r"--guidance = -5 is out of range; use a value from 0 to 100\."),
    (["--seed", "-1"], r"--seed = -1 must be at least 0\."),
    (["--ratios", "0.5,half"], r"ratios '0.5,half' is not a comma-separated list of numbers; e\.g\. 0\.5,1,2\."),
    (["--ratios", "1,1.0"], r"--ratios = \[1\.0, 1\.0\] lists ratio_1 more than once\."),
    (["--adjectives", "none,../up"], r"--adjectives = \['none', '\.\./up'\] has the entry '\.\./up', "
                                     r"which cannot name a folder"),
    (["--adjectives", ".hidden"], r"has the entry '\.hidden', which cannot name a folder"),
    (["--adjectives", "none,None"], r"lists no_adjective more than once\."),
])
def test_expand_refuses_bad_settings_before_any_work(tmp_path, capsys, extra, message):
    args = ["expand", "--checkpoint", str(tmp_path / "none.ckpt"), "--data", str(tmp_path / "d"),
            "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_expand_config_from_a_toml_section():
    from meddap.data.expand import ExpandConfig
    fixed = dict(checkpoint="", data="", out="")
    cfg = from_table(ExpandConfig, {"ratios": [0.5, 1], "adjectives": ["none", "dark"], "sampler": "ddim",
                                    "eta": 0.5}, "generate", **fixed)
    assert (cfg.ratios, cfg.adjectives, cfg.sampler, cfg.eta) == ((0.5, 1.0), ("none", "dark"), Sampler.DDIM, 0.5)
    assert (cfg.steps, cfg.guidance, cfg.height, cfg.width, cfg.dtype) == (30, 7.5, 512, 512, "fp32")
    with pytest.raises(MeddapError,
                       match=r"^\[generate\] guidance = 101 is out of range; use a value from 0 to 100\.$"):
        from_table(ExpandConfig, {"guidance": 101}, "generate", **fixed)
    with pytest.raises(MeddapError, match=r"^\[generate\] eta = 0\.5 applies to the ddim sampler only; "
                                          r"\[generate\] sampler = 'pndm' takes no eta"):
        from_table(ExpandConfig, {"eta": 0.5}, "generate", **fixed)
    with pytest.raises(MeddapError, match=r"\[generate\] adjectives = \['a/b'\] has the entry 'a/b'"):
        from_table(ExpandConfig, {"adjectives": ["a/b"]}, "generate", **fixed)


def test_generate_checks_its_keywords_by_the_config_rules(tiny_sd):
    with pytest.raises(MeddapError, match=r"^guidance = -5 is out of range; use a value from 0 to 100\.$"):
        generate(tiny_sd, ["x"], [0], guidance=-5, show_progress=False)
    with pytest.raises(MeddapError, match=r"^height = 12 must be a positive multiple of 8"):
        generate(tiny_sd, ["x"], [0], height=12, show_progress=False)
    with pytest.raises(MeddapError, match="unknown sampler 'euler'; choose one of ddpm, ddim, pndm"):
        generate(tiny_sd, ["x"], [0], sampler="euler", show_progress=False)


def test_long_prompt_warning_quotes_at_most_80_characters(tiny_sd):
    words = ["breast"] * 74 + ["zebra"] * 60
    with pytest.warns(UserWarning) as record:
        encode_prompts(tiny_sd, [" ".join(words)])
    message = str(record[0].message)
    prompt, dropped = re.fullmatch(r"prompt '(.*)' is longer than the text encoder's 77 tokens; "
                                   r"these words were dropped: '(.*)'", message).groups()
    assert len(prompt) == len(dropped) == 80 and prompt.endswith("…") and dropped.endswith("…")
    assert prompt.startswith("breast breast") and dropped.startswith("zebra zebra")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tiny_sd, [" ".join(words[:75])])


def test_load_model_records_both_hashes_and_checks_the_files(files, tmp_path):
    from meddap.lora import inject_lora, save_lora
    unet = build_stable_diffusion("tiny").unet
    inject_lora(unet, rank=2, targets="cross", generator=torch.Generator().manual_seed(0))
    save_lora(unet, tmp_path / "a.safetensors")
    sd = load_model(str(files / "tiny.safetensors"), str(tmp_path / "a.safetensors"), device="cpu")
    assert sd.source_sha256 == sha256_file(files / "tiny.safetensors")
    assert sd.lora_sha256 == sha256_file(tmp_path / "a.safetensors")
    assert load_model(str(files / "tiny.safetensors"), dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(MeddapError, match=r"checkpoint .*none\.ckpt does not exist; give a SD v1"):
        load_model(str(tmp_path / "none.ckpt"))
    with pytest.raises(MeddapError, match=r"^LoRA file .*b\.safetensors does not exist\.$"):
        load_model(str(files / "tiny.safetensors"), str(tmp_path / "b.safetensors"))
