"""New-token embeddings: prompt words the base's text tower never trained, learned beside the adapters.

Not in the paper. SD v1.4's CLIP tower was trained on 400M captions, so every word
of a MEDDAP prompt has a trained embedding and USLoRA only re-maps what the tower
already tells apart. The `tiny` base's tower was trained on the 55 token ids of its
shapes captions (meddap.pretrain); the rows of every other id are still at their
initialisation, N(0, 0.02²), and the tower maps them to nearly one context: the
benign and malignant prompts differ by 8.8% (relative rms over the 77 x 64 context),
caption words by 31-42% (weights/tiny/README.md). Adapters cannot learn a class
difference their inputs barely carry, and the demo's check stalled at 62-68%.

With `new_tokens` (`[lora] new_tokens`, `--new-tokens`) the adapter file also
carries an embedding row for each token of the training prompts that the base
never trained, as when new words are added to a pretrained language model:

    init   e_i = μ + R (√D q_i),  i = 1..n      R Rᵀ = Σ, q_1..q_n orthonormal in R^D
    train  with the adapters, on MEDDAP Eq. 1 (the same AdamW, lr and clipping)

μ, Σ: mean and covariance of the base's trained rows (D = 64 in `tiny`). Each e_i is
a draw of N(μ, Σ) in law (√D q_i has the second moment of a standard normal in D
dimensions), the "multivariate" initialisation of new vocabulary (Mundra et al.
2024, arXiv 2407.05841); the q_i are orthonormal (QR of a Gaussian matrix), so no
two new words start alike. Deviation from independent draws, which can start two
words of a prompt close together; in trial runs of the demo's check (seeds 0, 1, 2)
the two gave 83.3/96.7/85.0% and 85.0/87.8/78.3%, a difference within the check's
seed-to-seed spread (those trials, like every figure before commit 661ec6e, came from
runs that were not repeatable: see `lora_inputs`). Hewitt (2021) starts new words at
μ plus a draw of N(0, 10⁻⁵ Σ), all nearly alike; on the demo that gave 70.0/85.6/71.1%
against this init's 86.1/76.7/75.6% (repeatable runs, 154 steps at lr 6e-3). Training
the rows is textual inversion (Gal et al. 2022, arXiv 2208.01618), here together with
LoRA. On the demo (seeds 0, 1, 2, README; 154 steps at lr 6e-3): the adapted check went
from 65.0/67.8/61.7% to 86.1/76.7/75.6% (92.8/95.6/86.1% at the demo's current 231 steps
at lr 3e-3), and benign and malignant samples from 56-68% to 99/85/100% separable
by a linear two-sample classifier; the unadapted base is the same file and scores as before.

What counts as trained: a base says so through its `pretrain_*` metadata
(`meddap.pretrain.train.trained_token_ids`); SD v1.4 files have none, and every
row of CLIP was trained, so `new_tokens` is refused there. The unadapted base is
untouched: only a model loaded with the adapter file (`apply_new_tokens`) has the rows.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import functional_call

from meddap.errors import MeddapError
from meddap.io import stream_seed

NEW_TOKEN_STREAM = 9_000_000      # the init draw: a stream of its own, so the adapters' init and the
                                  # data order are those of a run without new tokens
WEIGHT = "token_embedding.weight"


def row_law(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, R) of trained embedding rows (S, D) float64: their mean and a root R Rᵀ = Σ of
    their covariance, R = Q Λ^½ from Σ = Q Λ Qᵀ (eigenvalues clipped at 0: with fewer rows
    than dimensions Σ is singular, and μ + R z stays on the rows' affine span without a
    jitter term). Shared by `init_rows` and pretraining stage 3b."""
    mu, sigma = rows.mean(0), torch.cov(rows.T)                              # (D,), (D, D)
    lam, q = torch.linalg.eigh(sigma)
    return mu, q * lam.clamp(min=0).sqrt()


@torch.no_grad()
def init_rows(weight: torch.Tensor, trained: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, D) float32: μ + R √D q_i over the `trained` rows of `weight` (module docstring;
    μ and R by `row_law`)."""
    rows = weight.detach().cpu().double()[trained.cpu()]                     # (S, D)
    mu, root = row_law(rows)
    D = rows.shape[1]
    if n > D:
        raise MeddapError(f"{n} new tokens but only {D} embedding dimensions: they cannot all be "
                          f"orthogonal; use shorter prompts.")
    g = torch.randn(D, n, generator=generator, dtype=torch.float64)
    q_n = torch.linalg.qr(g).Q                                              # (D, n), orthonormal columns
    return (mu + (D ** 0.5) * q_n.T @ root.T).float()                       # (n, D)


class NewTokens:
    """The trainable rows of one run: `ids` (n,) int64 and `rows` (n, D) float32 with grad,
    and the prompts' token ids `vocab` (sorted; the new ones among them)."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor, vocab: torch.Tensor):
        self.ids, self.rows, self.vocab = ids, rows, vocab
        self._slots = torch.searchsorted(vocab, ids)                         # where the new ids sit in vocab

    @classmethod
    def start(cls, text, trained: torch.Tensor, prompts: list[str], seed: int, device) -> "NewTokens":
        """Rows for the tokens of `prompts` (and of ∅) that are not in `trained`, drawn by
        `init_rows` from stream NEW_TOKEN_STREAM of `seed`."""
        vocab = torch.unique(text.tokenize(list(prompts) + [""]))            # sorted
        ids = vocab[torch.isin(vocab, trained.cpu(), invert=True)]
        if len(ids) == 0:
            raise MeddapError("new tokens: every token of the training prompts is one the base "
                              "trained; nothing to learn. Turn new_tokens off.")
        gen = torch.Generator().manual_seed(stream_seed(seed, NEW_TOKEN_STREAM))
        rows = init_rows(text.token_embedding.weight, trained, len(ids), gen)
        return cls(ids, rows.to(device).requires_grad_(True), vocab)

    def embed(self, text, tokens: torch.Tensor) -> torch.Tensor:
        """text(tokens) with the new rows, differentiable in them: (B, 77) -> (B, 77, D).
        The tower runs on a small embedding table, the rows of `vocab` (the base's, the
        new ones replaced), with the tokens renumbered into it: the same lookup as the
        full 49,408-row table, without copying it every step."""
        w = text.token_embedding.weight
        table = w.detach()[self.vocab.to(w.device)].index_copy(0, self._slots.to(w.device),
                                                                self.rows.to(w.dtype))   # (V', D)
        local = torch.searchsorted(self.vocab, tokens.cpu())
        if not torch.equal(self.vocab[local.clamp(max=len(self.vocab) - 1)], tokens.cpu()):
            raise ValueError("NewTokens.embed: a token outside the prompts it was started with")
        return functional_call(text, {WEIGHT: table}, (local,))


@torch.no_grad()
def apply_new_tokens(text, ids: torch.Tensor, rows: torch.Tensor, source: str | Path) -> None:
    """Write an adapter file's rows into the tower's token embedding (the adapted model's
    vocabulary). `source` names the file in errors."""
    w = text.token_embedding.weight
    if rows.ndim != 2 or rows.shape[1] != w.shape[1] or ids.shape != (rows.shape[0],):
        raise MeddapError(f"adapter file {source}: new-token rows {list(rows.shape)} with ids "
                          f"{list(ids.shape)} do not fit this text encoder's {w.shape[1]}-wide "
                          f"embedding; the adapter was made for another base.")
    if int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]:
        raise MeddapError(f"adapter file {source}: new-token ids {ids.tolist()} are outside this "
                          f"text encoder's vocabulary of {w.shape[0]}.")
    w[ids.to(w.device)] = rows.to(w.device, w.dtype)
