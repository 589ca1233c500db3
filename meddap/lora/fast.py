"""`train-lora --fast`: the training step of meddap.lora.train on static device buffers.

The fast step computes what `lora_loss` + `apply_gradients` compute, from the
same draws, with the host out of the way:

- the cached posterior moments of every image are one device tensor
  (N, 2 flips, 2, 4, h, w), the contexts one (n_classes + 1, 77, C); a step
  gathers its rows by device indices;
- every random draw still comes from the run's CPU generator, in the eager
  order (per image: crop row, crop column, flip; then the posterior noise η,
  t ~ U{0..999}, ε, then any caption dropout). The draws, and each row's line
  of the contexts (`caption_rows`, on the host), are written into staging
  buffers (pinned on a GPU) and copied with non_blocking into static device
  inputs: these copies are the step's only host->device traffic;
- √ᾱ_t and √(1 − ᾱ_t) are float32 device tables indexed by the device t
  (computed in float64 and cast, so table[t] equals NoiseSchedule.q_sample's);
- the step returns its loss as a device tensor; train_lora keeps losses in a
  device ring (`LossRing`) and writes log.csv every LOG_EVERY steps, with the
  eager loop's formatting, so the file is the same bytes.

On CUDA the optimizer is AdamW(fused=True) (`make_optimizer`; on the CPU it
is torch's multi-tensor AdamW, as in the eager loop), and in float32/bfloat16 without
gradient checkpointing the whole step (forward, backward, clipping, AdamW)
is captured once as a CUDA graph (torch.cuda.graphs) after WARMUP_STEPS
uncaptured steps, then replayed. With fp16 loss scaling or gradient
checkpointing the fast step runs uncaptured (the scaler's host-side state
machine and checkpoint's RNG bookkeeping are not graph-safe). On the CPU the
same static-buffer code runs without capture. Note: the CUDA parts (pinned
staging, events, fused AdamW, graph capture) are not run by the test suite,
which has no GPU; the CPU path and the fake-CUDA traffic count are.

`SelfCheckedStep` guards the first CHECK_STEPS steps: each is run fast and
eager from the same state and draws, and training continues with the eager
result; on a mismatch beyond the stated tolerance it warns and stays eager.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F

CHECK_STEPS = 10    # steps run both ways by SelfCheckedStep
LOG_EVERY = 50      # losses per write of log.csv (and at every checkpoint)
WARMUP_STEPS = 3    # uncaptured steps before a CUDA graph is captured (torch.cuda.graphs' advice)
# Tolerance of the self-check. On the CPU fast and eager agree bit for bit (the
# tests assert it); on a GPU the backward of SDPA and cuDNN may add atomics'
# rounding (~1e-7 relative), far inside these bounds, while a wrong input or
# formula moves the loss by percent.
LOSS_RTOL = 1e-3
PARAM_RTOL, PARAM_ATOL = 1e-3, 1e-6


def will_capture(device: torch.device, loss_scaling: bool, gradient_checkpointing: bool) -> bool:
    """Whether the fast step is captured as a CUDA graph: on CUDA, without fp16 loss scaling
    and without gradient checkpointing (neither is graph-safe)."""
    return (device.type == "cuda" and torch.cuda.is_available() and not loss_scaling
            and not gradient_checkpointing)


def make_optimizer(params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float, fused: bool, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the adapters; fused=True only where asked for and the parameters are on CUDA.
    Otherwise torch's multi-tensor (foreach) implementation, on the CPU too, where torch
    would pick its per-tensor loop: over the demo's 368 adapter tensors that loop is Python
    overhead, about a sixth of a tiny-UNet training step. The same update: on the CPU,
    train-lora's log.csv came out byte-identical to the loop's.
    `capturable`: the step will be recorded in a CUDA graph (torch refuses to capture the
    step of an AdamW built without it; its step counts then live on the device)."""
    on_cuda = params[0].device.type == "cuda"
    use_fused = fused and on_cuda
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=use_fused or None, foreach=None if use_fused else True,
                             capturable=capturable and on_cuda)


class FastStep:
    """One training step on static buffers: `draw(batch, rng)` then `run()` -> the device loss.

    images: a TrainImages with cached moments; contexts: (n_classes + 1, 77, C) on
    `device`. `update(loss)` is the eager update (meddap.lora.train.apply_gradients
    bound to the run's parameters, optimizer and scaler), so both paths apply one rule.
    """

    def __init__(self, sd, schedule, images, contexts: torch.Tensor, update, batch_size: int,
                 device: torch.device, dtype: torch.dtype, capture: bool, caption_dropout: float = 0.0):
        self.unet, self.scale, self.update, self.dtype = sd.unet, sd.vae.scale, update, dtype
        self.num_timesteps = schedule.num_timesteps
        from meddap.lora.train import caption_rows   # train.py imports this module: no top-level import
        self.caption_rows = functools.partial(caption_rows, images, caption_dropout=caption_dropout)
        self.moments = torch.stack(images.moments).to(device)       # (N, 2, 2, 4, h, w)
        self.contexts = contexts                                     # (n_classes + 1, 77, C)
        # DDPM Eq. 4 coefficients, built in float64 and cast: table[t] as NoiseSchedule.q_sample.
        self.sqrt_ab = schedule.alphas_cumprod.sqrt().float().to(device)                # (T,)
        self.sqrt_one_minus_ab = (1.0 - schedule.alphas_cumprod).sqrt().float().to(device)  # (T,)
        latent = (batch_size, *self.moments.shape[3:])               # (B, 4, h, w)
        shapes = {"index": ((batch_size,), torch.long), "flip": ((batch_size,), torch.long),
                  "t": ((batch_size,), torch.long), "eta": (latent, torch.float32),
                  "eps": (latent, torch.float32), "row": ((batch_size,), torch.long)}
        # Pinned memory and events need the CUDA driver; two staging sets, so the host
        # writes one while the other's copy may still be queued.
        self.on_gpu = device.type == "cuda" and torch.cuda.is_available()
        self.staged = [{k: torch.empty(s, dtype=d, pin_memory=self.on_gpu) for k, (s, d) in shapes.items()}
                       for _ in range(2)]
        self.copied = [None, None]                                   # a CUDA event per staging set
        self.inputs = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
        self.n = 0
        self.capture = capture and self.on_gpu
        self.graph, self.static_loss = None, None

    def draw(self, batch: torch.Tensor, rng: torch.Generator) -> None:
        """Draw the step's numbers from `rng` exactly as lora_loss does, and copy them to the device."""
        staged = self.staged[self.n % 2]
        if self.copied[self.n % 2] is not None:
            self.copied[self.n % 2].synchronize()   # this set's copy of two steps ago has left the host
        for j, i in enumerate(batch.tolist()):
            u = torch.rand(3, generator=rng)        # crop row, crop column (unused: cached), flip
            staged["index"][j] = i
            staged["flip"][j] = int(u[2] < 0.5)
        staged["eta"].copy_(torch.randn(staged["eta"].shape, generator=rng))      # η of sample_posterior
        staged["t"].copy_(torch.randint(0, self.num_timesteps, staged["t"].shape, generator=rng))
        staged["eps"].copy_(torch.randn(staged["eps"].shape, generator=rng))      # ε
        staged["row"].copy_(self.caption_rows(batch, rng=rng))      # each row's context line
        for k, x in self.inputs.items():
            x.copy_(staged[k], non_blocking=True)   # the step's only host->device copies
        if self.on_gpu:
            self.copied[self.n % 2] = torch.cuda.Event()
            self.copied[self.n % 2].record()
        self.n += 1

    def loss(self) -> torch.Tensor:
        """MEDDAP Eq. 1 on the static inputs: the 0-d float32 loss, on the device."""
        x = self.inputs
        m = self.moments[x["index"], x["flip"]]                      # (B, 2, 4, h, w)
        # z0 = scale · (mean + exp(logvar/2) ⊙ η): meddap.models.vae.sample_posterior's arithmetic
        z0 = self.scale * (m[:, 0] + torch.exp(0.5 * m[:, 1]) * x["eta"])           # (B, 4, h, w)
        t = x["t"]
        z_t = (self.sqrt_ab[t].view(-1, 1, 1, 1) * z0                               # DDPM Eq. 4
               + self.sqrt_one_minus_ab[t].view(-1, 1, 1, 1) * x["eps"])            # (B, 4, h, w)
        context = self.contexts[x["row"]]                                           # (B, 77, C)
        eps = self.unet(z_t.to(self.dtype), t, context)                             # (B, 4, h, w)
        return F.mse_loss(eps.float(), x["eps"])                                    # MEDDAP Eq. 1

    def body(self) -> torch.Tensor:
        """Forward, backward, clipping and AdamW: no host sync, no host<->device copy."""
        loss = self.loss()
        self.update(loss)
        return loss.detach()

    def run(self) -> torch.Tensor:
        """The step on the staged inputs; on CUDA with capture, a graph replay after warm-up."""
        if not self.capture:
            return self.body()
        if self.graph is None and self.n <= WARMUP_STEPS:
            side = torch.cuda.Stream()               # warm-up on a side stream, as torch.cuda.graphs asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.body()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):       # records this step; the replay below runs it
                self.static_loss = self.body()
        self.graph.replay()
        return self.static_loss


class LossRing:
    """Step losses kept on the device and written to log.csv in batches.

    The rows read "step,epoch,loss,lr" with `{loss:.6g}`, as the eager loop
    writes them; `flush` is the one wait for the device per batch of rows.
    """

    def __init__(self, log, lr: float, size: int, device: torch.device):
        self.log, self.lr = log, lr
        self.values = torch.zeros(size, device=device)               # (size,) float32
        self.rows: list[tuple[int, int]] = []                        # (step, epoch) of each value

    def add(self, step: int, epoch: int, loss: torch.Tensor) -> bool:
        """Keep the 0-d loss of `step`; True when the ring is full (then call flush)."""
        self.values[len(self.rows)].copy_(loss.detach())
        self.rows.append((step, epoch))
        return len(self.rows) == self.values.shape[0]

    def flush(self) -> float | None:
        """Write the kept rows; return the last loss (None if there was none)."""
        if not self.rows:
            return None
        values = self.values[:len(self.rows)].tolist()
        self.log.write("".join(f"{s},{e},{v:.6g},{self.lr:g}\n" for (s, e), v in zip(self.rows, values)))
        self.log.flush()
        self.rows = []
        return values[-1]


class SelfCheckedStep:
    """The first CHECK_STEPS fast steps, each checked against the eager step.

    For a checked step: keep the state (adapters, AdamW state, the generator),
    run the fast step, keep its loss and adapters, put the state back, run the
    eager step on the same draws, compare. Training goes on from the eager
    result. A mismatch (loss beyond LOSS_RTOL, adapters beyond PARAM_RTOL and
    PARAM_ATOL, or another number of draws) warns and turns the fast step off.
    """

    def __init__(self, fast: FastStep, eager, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler):
        self.fast, self.eager, self.params, self.optimizer, self.scaler = fast, eager, params, optimizer, scaler
        self.checked = 0
        self.use_fast = True

    def __call__(self, batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """One training step on `batch`; returns its 0-d device loss."""
        if not self.use_fast:
            return self.eager(batch, rng)
        if self.checked >= CHECK_STEPS:
            self.fast.draw(batch, rng)
            return self.fast.run()
        self.checked += 1
        kept = self._state(rng)
        self.fast.draw(batch, rng)
        fast_loss = self.fast.run().clone()
        fast_params = [p.detach().clone() for p in self.params]
        fast_rng = rng.get_state()
        self._restore(kept, rng)
        loss = self.eager(batch, rng)
        problem = self._compare(fast_loss, loss, fast_params, fast_rng, rng)
        if problem:
            warnings.warn(f"train-lora --fast: step {self.checked} of the self-check disagrees with the "
                          f"eager step ({problem}); training goes on with the eager step.", RuntimeWarning,
                          stacklevel=2)
            self.use_fast = False
        return loss

    def _state(self, rng: torch.Generator) -> dict:
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()["state"]),
                "scaler": copy.deepcopy(self.scaler.state_dict()), "rng": rng.get_state()}

    @torch.no_grad()
    def _restore(self, kept: dict, rng: torch.Generator) -> None:
        """Put the kept state back in place (the same tensors, which a CUDA graph points to)."""
        for p, saved in zip(self.params, kept["params"]):
            p.copy_(saved)
        for i, p in enumerate(self.params):
            for name, value in self.optimizer.state.get(p, {}).items():
                saved = kept["optimizer"].get(i, {}).get(name)
                if saved is None:
                    value.zero_()   # created by the fast step: AdamW's lazy init is zeros (step 0)
                else:
                    value.copy_(saved)
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(kept["scaler"])
        rng.set_state(kept["rng"])

    def _compare(self, fast_loss, loss, fast_params, fast_rng, rng) -> str | None:
        if not torch.equal(fast_rng, rng.get_state()):
            return "it drew another amount of random numbers"
        a, b = float(fast_loss), float(loss.detach())
        if not abs(a - b) <= LOSS_RTOL * abs(b):
            return f"loss {a:.6g} against {b:.6g}, tolerance {LOSS_RTOL:g} relative"
        for f, p in zip(fast_params, self.params):
            if not torch.allclose(f, p, rtol=PARAM_RTOL, atol=PARAM_ATOL):
                return (f"adapters differ by up to {(f - p).abs().max().item():.3g}, tolerance "
                        f"{PARAM_ATOL:g} + {PARAM_RTOL:g} relative")
        return None
