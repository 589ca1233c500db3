"""train-lora --fast: the same run as the eager step on the CPU, a self-check that falls back,
and the fast step's host<->device traffic on a fake CUDA device (tests/fake_cuda.py)."""
import warnings
from collections import Counter

import pytest
import torch

from fake_cuda import fake_cuda, line_of
from meddap.cli import main
from meddap.errors import MeddapError
from meddap.lora import fast as fast_module
from meddap.lora.adapter import lora_parameters
from meddap.lora.fast import CHECK_STEPS, FastStep, LossRing, make_optimizer
from meddap.lora.train import (ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, MAX_GRAD_NORM, LoRARunConfig,
                               apply_gradients, clip_gradients, lora_loss, train_lora)
from meddap.sampling.schedule import NoiseSchedule
from meddap.settings import from_table
from test_cuda_fake_paths import CUDA, adapted_model, images  # noqa: F401 (images is a fixture)
from test_lora_train import adapters, assert_same_adapters, config, files, losses, one_thread  # noqa: F401

FAST = "meddap/lora/fast.py"
# The fast step's only traffic: its five staged inputs (index, flip, t, η, ε), one copy each.
STAGED_INPUTS = {("cpu->cuda", line_of(FAST, "x.copy_(staged[k], non_blocking=True)")): 6}   # index, flip, t, η, ε, row
# Kernel-launching CUDA operators of one fast forward (+ loss-ring write) on the tiny config,
# recorded: a change that adds kernels to the step fails here and says which ops dominate.
FAST_FORWARD_KERNELS = 7524    # 7527 before each row's context line was staged (no device label gather)


def run_both(files, tmp_path, **kw):
    train_lora(config(files, tmp_path / "eager", cache_latents=True, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a self-check fallback would fail the test
        train_lora(config(files, tmp_path / "fast", cache_latents=True, fast=True, **kw))
    return tmp_path / "eager", tmp_path / "fast"


def test_fast_equals_eager_over_50_steps(files, tmp_path):
    """On the CPU the fast step is the eager arithmetic on the same draws: tolerance zero."""
    eager, fast = run_both(files, tmp_path, max_steps=50, checkpoint_every=20)
    assert len(losses(fast)) == 50 and (losses(fast) == losses(eager)).all()
    assert (fast / "log.csv").read_bytes() == (eager / "log.csv").read_bytes()
    assert_same_adapters(adapters(fast), adapters(eager))
    eager_state = torch.load(eager / "train_state.pt", weights_only=True)
    fast_state = torch.load(fast / "train_state.pt", weights_only=True)
    assert torch.equal(fast_state["rng"]["loop"], eager_state["rng"]["loop"])   # the same draws


def test_fast_equals_eager_with_caption_dropout(files, tmp_path):
    """The dropout draws (after ε) and each row's context line are staged like the others."""
    eager, fast = run_both(files, tmp_path, max_steps=8, checkpoint_every=4, caption_dropout=0.5)
    assert (fast / "log.csv").read_bytes() == (eager / "log.csv").read_bytes()
    assert_same_adapters(adapters(fast), adapters(eager))
    plain = tmp_path / "plain"
    train_lora(config(files, plain, cache_latents=True, max_steps=8, checkpoint_every=4))
    assert (plain / "log.csv").read_bytes() != (eager / "log.csv").read_bytes()   # the dropout acts


def test_fast_with_a_short_last_batch_and_a_resume_equals_eager(files, tmp_path):
    """6 images in batches of 4: every second step is short and takes the eager step."""
    eager, fast = run_both(files, tmp_path, max_steps=14, batch_size=4, checkpoint_every=5)
    train_lora(config(files, tmp_path / "resumed", cache_latents=True, fast=True, max_steps=7,
                      batch_size=4, checkpoint_every=5))
    train_lora(config(files, tmp_path / "resumed", cache_latents=True, fast=True, max_steps=14,
                      batch_size=4, checkpoint_every=5))
    for run in (fast, tmp_path / "resumed"):
        assert (run / "log.csv").read_bytes() == (eager / "log.csv").read_bytes()
        assert_same_adapters(adapters(run), adapters(eager))


@pytest.mark.parametrize("perturb, problem", [
    ("loss", r"\(loss [0-9.e+-]+ against [0-9.e+-]+, tolerance 0.001 relative\)"),
    ("draws", r"\(it drew another amount of random numbers\)"),
])
def test_a_wrong_fast_step_warns_and_falls_back_to_eager(files, tmp_path, monkeypatch, perturb, problem):
    train_lora(config(files, tmp_path / "eager", cache_latents=True, max_steps=12))
    if perturb == "loss":   # 1% off: the self-check's first step must see it
        loss = FastStep.loss
        monkeypatch.setattr(FastStep, "loss", lambda self: 1.01 * loss(self))
    else:                   # one extra number drawn per step
        draw = FastStep.draw
        monkeypatch.setattr(FastStep, "draw", lambda self, batch, rng: (torch.rand(1, generator=rng),
                                                                         draw(self, batch, rng)))
    with pytest.warns(RuntimeWarning, match=r"^train-lora --fast: step 1 of the self-check disagrees with "
                                            r"the eager step " + problem + r"; training goes on with the "
                                            r"eager step\.$"):
        train_lora(config(files, tmp_path / "fast", cache_latents=True, fast=True, max_steps=12))
    assert (tmp_path / "fast" / "log.csv").read_bytes() == (tmp_path / "eager" / "log.csv").read_bytes()
    assert_same_adapters(adapters(tmp_path / "fast"), adapters(tmp_path / "eager"))


def test_a_fast_step_wrong_after_the_self_check_would_train_wrongly(files, tmp_path, monkeypatch):
    """The check covers CHECK_STEPS steps: a fault from then on is not caught (this test shows
    the check is what keeps the first ones right, and that it ends)."""
    loss = FastStep.loss

    def wrong_late(self):
        return loss(self) * (1.5 if self.n > CHECK_STEPS else 1.0)

    monkeypatch.setattr(FastStep, "loss", wrong_late)
    train_lora(config(files, tmp_path / "eager", cache_latents=True, max_steps=CHECK_STEPS + 1))
    train_lora(config(files, tmp_path / "fast", cache_latents=True, fast=True, max_steps=CHECK_STEPS + 1))
    eager, fast = losses(tmp_path / "eager"), losses(tmp_path / "fast")
    assert (fast[:CHECK_STEPS] == eager[:CHECK_STEPS]).all() and fast[-1] != eager[-1]


def test_fast_needs_cached_latents(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train-lora", "--checkpoint", "x", "--data", "y", "--out", str(out), "--fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        "meddap train-lora: error: --fast needs --cache-latents: the fast step gathers cached latents "
        "on the device; add --cache-latents or leave --fast off.")
    with pytest.raises(MeddapError, match=r"^\[lora\] fast needs \[lora\] cache_latents: "):
        from_table(LoRARunConfig, {"fast": True}, "lora",
                   checkpoint="c", data="d", out="o")
    assert not out.exists()


def test_cpu_optimizer_is_multi_tensor_and_cuda_fast_is_fused():
    cpu = make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-4, ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY,
                         fused=True)
    assert cpu.defaults["fused"] is None and cpu.defaults["foreach"] is True
    with fake_cuda():
        gpu = make_optimizer([torch.nn.Parameter(torch.zeros(2, device="cuda"))], 1e-4, ADAM_BETAS, ADAM_EPS,
                             ADAM_WEIGHT_DECAY, fused=True)
    assert gpu.defaults["fused"] is True and gpu.defaults["foreach"] is None


def test_multi_tensor_adamw_and_clip_follow_the_per_tensor_loop():
    """make_optimizer's foreach AdamW with clip_gradients gives torch's per-tensor AdamW and
    clip (the oracle) to rounding, over 20 steps on 30 tensors of adapter-like shapes. The
    gradients' norms range from 0.03 to 300, so some steps are clipped and some are not
    (Adam is blind to a constant scale, not to a changing one)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 64), (64, 16), (16, 128), (128, 16), (16, 32)] * 6
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = make_optimizer(ours, 3e-3, ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, fused=False)
    oracle = torch.optim.AdamW(ref, lr=3e-3, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAM_WEIGHT_DECAY,
                               foreach=False)
    for _ in range(20):
        scale = 10 ** (4 * torch.rand((), generator=g).item() - 4)     # joint norm ~ 300 * scale
        grads = [scale * torch.randn(s, generator=g) for s in shapes]
        for p, q, d in zip(ours, ref, grads):
            p.grad, q.grad = d.clone(), d.clone()
        clip_gradients(ours)
        torch.nn.utils.clip_grad_norm_(ref, MAX_GRAD_NORM, foreach=False)
        opt.step()
        oracle.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fast_step_on_cuda_copies_only_its_staged_inputs(images):  # noqa: F811
    batch = torch.tensor([1, 0])
    with fake_cuda() as fc:
        sd, rng = adapted_model(CUDA)
        params = lora_parameters(sd.unet)
        contexts = images.embed_prompts(sd.text_encoder, as_released=False)
        images.cache_latents(sd.vae, show_progress=False)
        try:
            optimizer = make_optimizer(params, 1e-4, ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, fused=True)
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            update = lambda loss: apply_gradients(loss, params, optimizer, scaler)  # noqa: E731
            fast = FastStep(sd, NoiseSchedule.sd_v1(), images, contexts, update, 2, CUDA, torch.float32,
                            capture=True)
        finally:
            images.moments = None
        ring = LossRing(None, 1e-4, 4, CUDA)
        fc.reset()
        fast.draw(batch, rng)
        assert fc.syncs == Counter(STAGED_INPUTS)
        fc.reset()
        loss = fast.loss()                                   # the forward half of the step body
        ring.add(1, 0, loss)
        assert (loss.shape, loss.dtype, loss.device) == ((), torch.float32, CUDA)
        assert fc.syncs == Counter()
        assert sum(fc.kernels.values()) == FAST_FORWARD_KERNELS, fc.kernels.most_common(8)
        # The update half: backward does not run under the fake mode, so the gradients are
        # set by hand; clipping and fused AdamW then run on the device without a sync.
        for p in params:
            p.grad = torch.ones_like(p)
        fc.reset()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        assert fc.syncs == Counter() and len(optimizer.state) == len(params)
        assert fast.capture is False   # a graph needs the driver: the fake device runs uncaptured
    fake_draws = rng.get_state()

    # The eager step on the CPU draws the same numbers from the run's generator.
    sd, rng = adapted_model(torch.device("cpu"))
    contexts = images.embed_prompts(sd.text_encoder, as_released=False)
    images.cache_latents(sd.vae, show_progress=False)
    try:
        lora_loss(sd, NoiseSchedule.sd_v1(), images, contexts, batch, rng, torch.device("cpu"), torch.float32)
    finally:
        images.moments = None
    assert torch.equal(rng.get_state(), fake_draws)


def test_the_fast_module_waits_for_the_device_only_when_flushing_the_log():
    import inspect
    source = inspect.getsource(fast_module)
    body = inspect.getsource(FastStep.body) + inspect.getsource(FastStep.loss) + inspect.getsource(FastStep.draw)
    assert ".item()" not in body and ".tolist()" not in body.replace("batch.tolist()", "")
    assert source.count(".tolist()") == 2   # the CPU batch in draw, the ring in flush
