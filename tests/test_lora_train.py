"""USLoRA training on the tiny config: loss falls, exact resume, caching, bad input."""
import dataclasses
import re

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
                resolution=64, lr=1e-3, targets="all", checkpoint_every=5, device="cpu", show_progress=False)
    return LoRARunConfig(**{**base, **kw})


def adapters(out):
    return load_file(str(out / "lora.safetensors"))


def assert_same_adapters(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out):
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr"
    return np.array([float(r.split(",")[2]) for r in rows[1:]])


def kill_at_step(monkeypatch, n: int) -> None:
    """Make train_lora's n-th step raise KeyboardInterrupt (while it draws its latents),
    as a kill would; monkeypatch.undo() lifts it."""
    calls = {"n": 0}
    latents = TrainImages.latents

    def dies(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return latents(self, *args)

    monkeypatch.setattr(TrainImages, "latents", dies)


def test_defaults_are_the_papers():
    cfg = LoRARunConfig(checkpoint="x", data="y", out="z")
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.lr, cfg.epochs, cfg.batch_size, cfg.resolution,
            cfg.seed) == (4, None, "cross", 1e-4, 100, 1, 224, 42)
    assert cfg.caption_dropout == 0.0                     # neither the paper nor the released script drops captions
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

    kill_at_step(monkeypatch, 8)
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
    (dict(rank=0), r"--rank = 0 is out of range; use a value from 1 to 1024 \(the paper uses 4\)\."),
    (dict(targets=("*.attn2.to_k", "*.attn7.*")), r"pattern '\*\.attn7\.\*' matches no linear layer"),
    (dict(mixed_precision=MixedPrecision.FP16), "fp16 needs a CUDA device"),
    (dict(resolution=60), r"--resolution = 60 must be a positive multiple of 8 \(the VAE downsamples by 8\)\."),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(files, tmp_path, change, match):
    bad_folders(tmp_path)
    if "data" in change:
        change = {**change, "data": str(tmp_path / change["data"])}
    cfg = dataclasses.replace(config(files, tmp_path / "out", max_steps=2), **change)
    with pytest.raises(MeddapError, match=match):
        train_lora(cfg)
    assert not (tmp_path / "out").exists()


def help_text(capsys, argv):
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return " ".join(capsys.readouterr().out.split())   # argparse wraps lines


def test_help_shows_the_declared_defaults(capsys):
    text = help_text(capsys, ["train-lora"])
    for flag, default in (("--rank", "4"), ("--targets", "cross"), ("--lr", "0.0001"), ("--epochs", "100"),
                          ("--batch-size", "1"), ("--resolution", "224"), ("--seed", "42"),
                          ("--mixed-precision", "no"), ("--checkpoint-every", "500"),
                          ("--validate-every", "0"), ("--validation-steps", "30")):
        help_of_flag = text.split(f" {flag} ", 1)[1]
        assert f"(default: {default})" in help_of_flag.split(" --", 1)[0], flag
    for flag in ("--checkpoint", "--data", "--out", "--alpha", "--max-steps", "--device",
                 "--gradient-checkpointing", "--cache-latents", "--validation-prompts", "--as-released",
                 "--quiet"):
        assert f" {flag} " in text, flag


def test_help_follows_a_changed_declaration(capsys, monkeypatch):
    """The help reads the field's declaration, not a second typed-in default (lora-info shares it)."""
    monkeypatch.setattr(LoRARunConfig.__dataclass_fields__["rank"], "default", 8)
    for command in ("train-lora", "lora-info"):
        assert "LoRA rank r (paper: 4) (default: 8)" in help_text(capsys, [command])


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "--rank = 0 is out of range; use a value from 1 to 1024 (the paper uses 4)."),
    (["--alpha", "0"], "--alpha = 0 must be a finite number above 0."),
    (["--lr", "2"], "--lr = 2 must be above 0 and at most 1 (the paper uses 1e-4)."),
    (["--max-steps", "0"], "--max-steps = 0 must be at least 1."),
    (["--seed", "-1"], "--seed = -1 must be at least 0."),
    (["--caption-dropout", "1"], "--caption-dropout = 1 must be at least 0 and below 1 (paper: 0)."),
    (["--validate-every", "-1"], "--validate-every = -1 must be at least 0."),
    (["--device", "gpu"], "--device = 'gpu' is not a device; use cpu, cuda or cuda:N."),
    (["--mixed-precision", "fp16", "--device", "cpu"],
     "--mixed-precision fp16 needs a CUDA device; on cpu training runs in float32 (--mixed-precision no)."),
])
def test_cli_settings_errors_name_the_flag(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["train-lora", "--checkpoint", "x", "--data", "y", "--out", str(out)] + argv) == 2
    assert capsys.readouterr().err.strip() == f"meddap train-lora: error: {message}"
    assert not out.exists()


def test_config_file_errors_name_the_key():
    from meddap.settings import from_table, toml_label

    fixed = dict(checkpoint="c", data="d", out="o")
    with pytest.raises(MeddapError, match=r"^\[lora\] max_steps = 0 must be at least 1\.$"):
        from_table(LoRARunConfig, {"max_steps": 0}, "lora", **fixed)
    with pytest.raises(MeddapError, match=r"^\[lora\] caption_dropout = -0.1 must be at least 0 and below 1"):
        from_table(LoRARunConfig, {"caption_dropout": -0.1}, "lora", **fixed)
    assert from_table(LoRARunConfig, {"caption_dropout": 0.1}, "lora", **fixed).caption_dropout == 0.1
    assert from_table(LoRARunConfig, {"targets": ["all"]}, "lora", **fixed).targets == "all"
    assert from_table(LoRARunConfig, {"targets": "*.attn2.to_k"}, "lora", **fixed).targets == ("*.attn2.to_k",)
    cfg = dataclasses.replace(LoRARunConfig(**fixed), mixed_precision=MixedPrecision.BF16, device="cpu")
    with pytest.raises(MeddapError, match=r"^\[lora\] mixed_precision bf16 needs a CUDA device"):
        train_lora(cfg, toml_label("lora"))


class Hostile:
    """Not a tensor: `torch.load(weights_only=True)` refuses to unpickle it."""


@pytest.mark.parametrize("damage", ["torn", "hostile", "foreign"])
def test_unreadable_train_state_names_the_file(files, tmp_path, damage):
    state = tmp_path / "train_state.pt"
    train_lora(config(files, tmp_path, max_steps=2))
    if damage == "torn":                       # killed mid-write by something other than us
        state.write_bytes(state.read_bytes()[:1000])
    else:
        torch.save({"key": Hostile()} if damage == "hostile" else {"step": 3}, state)
    name = re.escape(str(state))
    expected = (rf"^resume checkpoint {name} is not a train-lora state" if damage == "foreign" else
                rf"^resume checkpoint {name} cannot be read \((UnpicklingError|RuntimeError)\); delete it")
    with pytest.raises(MeddapError, match=expected) as error:
        train_lora(config(files, tmp_path, max_steps=4))
    assert str(error.value).endswith("delete it to restart this run from step 0.")
    assert "weights_only" not in str(error.value)


def test_cpu_run_saves_no_cuda_rng_state(files, tmp_path, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run touched a CUDA generator")

    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    train_lora(config(files, tmp_path, max_steps=2, checkpoint_every=1))
    train_lora(config(files, tmp_path, max_steps=3))   # resumes: restores the states it saved
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert sorted(state["rng"]) == ["loop", "numpy", "python", "torch"]


def test_cuda_rng_state_is_the_training_devices_only(monkeypatch):
    """Saved and restored: torch.cuda.get_rng_state(device) of the training GPU, never
    the states of all GPUs (which fails on a host with fewer GPUs). No GPU needed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's state"))
    gpu = torch.device("cuda", 1)
    states = train_module._rng_states(torch.Generator().manual_seed(0), gpu)
    assert torch.equal(states["cuda"], torch.full((8,), 7, dtype=torch.uint8))
    train_module._set_rng_states(torch.Generator(), states, gpu)
    assert calls[0] == ("get", gpu) and calls[1][:2] == ("set", gpu) and torch.equal(calls[1][2], states["cuda"])
    train_module._set_rng_states(torch.Generator(), states, torch.device("cpu"))   # resumed on the CPU
    assert len(calls) == 2


def test_bf16_on_a_gpu_without_bf16_is_a_clear_error(files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "resolve_device", lambda name, flag: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cfg = config(files, tmp_path / "out", mixed_precision=MixedPrecision.BF16, max_steps=1)
    with pytest.raises(MeddapError, match=r"^--mixed-precision bf16: Tesla T4 has no bfloat16 support"):
        train_lora(cfg)
    assert not (tmp_path / "out").exists()


def test_caption_dropout_swaps_in_the_empty_prompt_after_the_other_draws(files):
    """lora_inputs with caption dropout p: z_t, t and ε are those of p = 0 from the same
    generator state (the dropout draws come last), and row b's context is τ(∅) exactly
    where a replay of those B uniforms is below p, its class's τ(c) elsewhere."""
    from meddap.models.stable_diffusion import load_stable_diffusion
    from meddap.sampling.schedule import NoiseSchedule
    from meddap.data.datasets import resolve_training_images

    sd = load_stable_diffusion(files / "tiny.safetensors")
    images = TrainImages(resolve_training_images(str(files / "square")), 64, show_progress=False)
    contexts = images.embed_prompts(sd.text_encoder, as_released=False)   # (n_classes + 1, 77, C)
    assert contexts.shape[0] == len(images.classes) + 1 == images.empty_row + 1
    empty = sd.text_encoder(sd.text_encoder.tokenize([""]))[0]
    assert torch.equal(contexts[images.empty_row], empty)
    batch = torch.arange(len(images)).repeat(4)                           # 24 rows
    schedule, cpu = NoiseSchedule.sd_v1(), torch.device("cpu")

    def draw(p):
        rng = torch.Generator().manual_seed(7)
        return train_module.lora_inputs(sd.vae, schedule, images, contexts, batch, rng, cpu, p), rng

    (z0, t0, eps0, c0), rng0 = draw(0.0)
    (z, t, eps, c), rng = draw(0.5)
    assert torch.equal(z, z0) and torch.equal(t, t0) and torch.equal(eps, eps0)
    dropped = torch.rand(len(batch), generator=rng0) < 0.5                # the replay: p = 0 drew none
    assert torch.equal(rng.get_state(), rng0.get_state())
    assert 0 < dropped.sum() < len(batch)                                 # both kinds of rows occur
    assert torch.equal(c[dropped], empty.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(c[~dropped], contexts[images.labels[batch][~dropped]])
    assert torch.equal(c0, contexts[images.labels[batch]])               # p = 0: every row its class
