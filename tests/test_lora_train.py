"""USLoRA training on the tiny config: loss falls, exact resume, caching, bad input."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.io import sha256_file
from meddap.lora import read_lora_file, train as train_module
from meddap.lora.train import LoRARunConfig, MixedPrecision, TrainImages, train_lora
from meddap.models.stable_diffusion import build_stable_diffusion, save_stable_diffusion
from meddap.sampling.text_to_image import read_png_metadata


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's kernels are too small to gain from threads, and on a busy
    machine two spinning OpenMP threads slow each step down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(root, size=(72, 64), per_class=3):
    """Synthetic 'ultrasound' folders: a flat background and a bright block whose
    position depends on the image, darker for benign than for malignant."""
    for c, level in (("benign", 60), ("malignant", 180)):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = np.full((*size, 3), level, np.uint8)                     # (H, W, 3)
            a[20:40, 8 + 10 * i:28 + 10 * i] = 255 - level
            Image.fromarray(a).save(root / c / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    torch.manual_seed(0)
    save_stable_diffusion(build_stable_diffusion("tiny"), root / "tiny.safetensors")
    write_images(root / "tall")                      # 72 x 64: the random crop moves
    write_images(root / "square", size=(64, 64))     # 64 x 64: the only crop is the center
    return root


def config(files, out, **kw):
    base = dict(checkpoint=str(files / "tiny.safetensors"), data=str(files / "tall"), out=str(out),
                resolution=64, lr=1e-3, targets="all", checkpoint_every=5, show_progress=False)
    return LoRARunConfig(**{**base, **kw})


def adapters(out):
    return load_file(str(out / "lora.safetensors"))


def assert_same_adapters(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out):
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr"
    return np.array([float(r.split(",")[2]) for r in rows[1:]])


def test_defaults_are_the_papers():
    cfg = LoRARunConfig(checkpoint="x", data="y", out="z")
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.lr, cfg.epochs, cfg.batch_size, cfg.resolution,
            cfg.seed) == (4, None, "cross", 1e-4, 100, 1, 224, 42)
    assert (train_module.ADAM_BETAS, train_module.ADAM_WEIGHT_DECAY, train_module.MAX_GRAD_NORM) == \
        ((0.9, 0.999), 1e-2, 1.0)


def test_loss_falls(files, tmp_path):
    train_lora(config(files, tmp_path, max_steps=300, cache_latents=True, checkpoint_every=300))
    loss = losses(tmp_path)
    assert len(loss) == 300
    assert loss[-50:].mean() < 0.9 * loss[:50].mean()


def test_killed_and_resumed_equals_uninterrupted(files, tmp_path, monkeypatch):
    kw = dict(max_steps=12, batch_size=2)   # 6 images, batch 2: epochs of 3 steps
    straight, killed, stopped = tmp_path / "straight", tmp_path / "killed", tmp_path / "stopped"
    train_lora(config(files, straight, **kw))

    calls = {"n": 0}
    latents = TrainImages.latents

    def dies_at_step_8(self, *args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return latents(self, *args)

    monkeypatch.setattr(TrainImages, "latents", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_lora(config(files, killed, **kw))
    monkeypatch.undo()
    assert not (killed / "lora.safetensors").exists()
    assert len(losses(killed)) == 7           # logged past the checkpoint of step 5
    train_lora(config(files, killed, **kw))   # resumes from step 5

    train_lora(config(files, stopped, **{**kw, "max_steps": 5}))
    assert read_lora_file(stopped / "lora.safetensors").metadata["meddap_step"] == "5"
    train_lora(config(files, stopped, **kw))

    for run in (killed, stopped):
        assert_same_adapters(adapters(run), adapters(straight))
        assert (run / "log.csv").read_text() == (straight / "log.csv").read_text()
    assert read_lora_file(killed / "lora.safetensors").metadata["meddap_step"] == "12"


def test_resume_with_other_settings_is_refused(files, tmp_path):
    train_lora(config(files, tmp_path, max_steps=2))
    with pytest.raises(MeddapError, match="differs in: lr"):
        train_lora(config(files, tmp_path, max_steps=4, lr=5e-4))


def test_cached_latents_change_only_the_crop(files, tmp_path):
    """On square images the center crop is the only crop: caching computes the same run."""
    kw = dict(data=str(files / "square"), max_steps=6, targets="cross")
    train_lora(config(files, tmp_path / "plain", **kw))
    train_lora(config(files, tmp_path / "cached", cache_latents=True, **kw))
    a, b = adapters(tmp_path / "plain"), adapters(tmp_path / "cached")
    assert_same_adapters(a, b)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.endswith("lora_up"))


def test_gradient_checkpointing_changes_nothing(files, tmp_path):
    train_lora(config(files, tmp_path / "plain", max_steps=3))
    train_lora(config(files, tmp_path / "gc", max_steps=3, gradient_checkpointing=True))
    assert_same_adapters(adapters(tmp_path / "plain"), adapters(tmp_path / "gc"))


def test_validation_images_leave_training_untouched(files, tmp_path):
    kw = dict(max_steps=4, validation_steps=3)
    train_lora(config(files, tmp_path / "plain", **kw))
    train_lora(config(files, tmp_path / "val", validate_every=2, **kw))
    assert_same_adapters(adapters(tmp_path / "plain"), adapters(tmp_path / "val"))
    pngs = sorted(p.name for p in (tmp_path / "val" / "validation").iterdir())
    assert pngs == [f"step_{s:07d}_{i:02d}.png" for s in (2, 4) for i in (0, 1)]
    meta = read_png_metadata(tmp_path / "val" / "validation" / pngs[1])
    assert meta["prompt"] == "ultrasound image of malignant tumor in the breast" and meta["train_step"] == 2


def test_cli_run_records_provenance(files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train-lora", "--checkpoint", str(files / "tiny.safetensors"), "--data", str(files / "tall"),
                 "--out", str(out), "--resolution", "64", "--max-steps", "3", "--rank", "2",
                 "--targets", "*.attn2.to_k", "*.attn2.to_v", "--as-released", "--device", "cpu",
                 "--quiet"]) == 0
    lora = read_lora_file(out / "lora.safetensors")
    meta = lora.metadata
    assert lora.rank == 2 and len(lora.layers()) == 32
    assert meta["meddap_base_sha256"] == sha256_file(files / "tiny.safetensors")
    assert meta["meddap_base_config"] == "tiny" and meta["meddap_step"] == "3"
    assert meta["meddap_targets"] == '["*.attn2.to_k", "*.attn2.to_v"]'
    assert '"as_released": true' in meta["meddap_training_args"]
    assert "lora.safetensors" in capsys.readouterr().out


def bad_folders(root):
    (root / "empty").mkdir()
    write_images(root / "no_images")
    for p in (root / "no_images" / "malignant").iterdir():
        p.unlink()
    write_images(root / "unreadable")
    (root / "unreadable" / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.mark.parametrize("change,match", [
    (dict(data="empty"), "has no class sub-folders"),
    (dict(data="no_images"), "class 'malignant' .* has no images"),
    (dict(data="unreadable"), "cannot read image .*broken.png"),
    (dict(rank=0), "rank 0 is not a positive integer"),
    (dict(targets=("*.attn2.to_k", "*.attn7.*")), r"pattern '\*\.attn7\.\*' matches no linear layer"),
    (dict(mixed_precision=MixedPrecision.FP16), "fp16 needs a CUDA device"),
    (dict(resolution=60), "not a multiple of 8"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(files, tmp_path, change, match):
    bad_folders(tmp_path)
    if "data" in change:
        change = {**change, "data": str(tmp_path / change["data"])}
    cfg = dataclasses.replace(config(files, tmp_path / "out", max_steps=2), **change)
    with pytest.raises(MeddapError, match=match):
        train_lora(cfg)
    assert not (tmp_path / "out").exists()
