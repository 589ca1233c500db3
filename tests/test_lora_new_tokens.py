"""New-token embeddings (meddap.lora.new_tokens): the orthogonal N(μ, Σ) init in closed
form, which tokens get rows, the small-table lookup against the tower with the rows in
place, training and exact resume, the adapter file, and where they are refused."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meddap.data.prompts import prompt_for
from meddap.errors import MeddapError
from meddap.lora import read_lora_file, write_lora_file
from meddap.lora.new_tokens import NewTokens, apply_new_tokens, init_rows
from meddap.lora.train import LoRARunConfig, train_lora
from meddap.models.stable_diffusion import build_stable_diffusion, load_stable_diffusion, save_stable_diffusion
from meddap.pretrain.train import trained_token_ids
from meddap.sampling.generation import load_model
from meddap.settings import validate

from tests.test_lora_train import kill_at_step, write_images

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "tiny-sd.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_init_rows_are_whitened_orthonormal_directions_around_the_trained_mean():
    """With Σ = R Rᵀ of full rank, w_i = R⁻¹(e_i − μ) = √D q_i: w_i · w_j = D δ_ij exactly,
    so every new row has the mean second moment of N(μ, Σ) and no two start alike."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1000, 4, generator=g) @ torch.tensor([[1.0, 0, 0, 0], [0.5, 2, 0, 0],
                                                                [0, -1, 0.3, 0], [0.2, 0, 0, 0.1]]).T + 3.0
    trained = torch.arange(0, 1000, 7)
    rows = init_rows(weight, trained, 3, torch.Generator().manual_seed(0)).double()
    e = weight[trained].double()
    mu, sigma = e.mean(0), torch.cov(e.T)
    w = torch.linalg.solve(torch.linalg.cholesky(sigma), (rows - mu).T).T        # any R with R Rᵀ = Σ
    assert torch.allclose(w @ w.T, 4 * torch.eye(3, dtype=torch.float64), atol=1e-4)
    assert torch.equal(init_rows(weight, trained, 3, torch.Generator().manual_seed(0)), rows.float())
    with pytest.raises(MeddapError, match="5 new tokens but only 4 embedding dimensions"):
        init_rows(weight, trained, 5, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    sd = load_stable_diffusion(SHIPPED)
    return sd, trained_token_ids(SHIPPED, sd.text_encoder, show_progress=False)


def test_rows_go_to_the_prompt_tokens_the_base_never_trained(tiny):
    sd, trained = tiny
    text = sd.text_encoder
    assert len(trained) == 55 and {49406, 49407} <= set(trained.tolist())      # its captions, and ∅'s tokens
    prompts = [prompt_for(c) for c in ("benign", "malignant", "normal")]
    new = NewTokens.start(text, trained, prompts, seed=0, device="cpu")
    used = set(text.tokenize(prompts + [""]).unique().tolist())
    assert set(new.ids.tolist()) == used - set(trained.tolist())
    assert {1465, 2326, 41122, 773} <= set(new.ids.tolist())                     # ben ign, malig nant
    assert new.rows.shape == (len(new.ids), 64) and new.rows.requires_grad
    assert trained_token_ids("no/such/file.safetensors", text) is None


def test_embed_is_the_tower_with_the_rows_in_place_and_carries_their_gradient(tiny):
    """The small-table lookup gives bit for bit what the full tower gives once
    `apply_new_tokens` has written the rows, and the loss reaches the rows."""
    sd, trained = tiny
    text = sd.text_encoder
    prompts = [prompt_for(c) for c in ("benign", "malignant", "normal")]
    new = NewTokens.start(text, trained, prompts, seed=1, device="cpu")
    tokens = text.tokenize(prompts + [""])
    out = new.embed(text, tokens)
    out.pow(2).sum().backward()
    assert new.rows.grad is not None and (new.rows.grad.norm(dim=1) > 0).all()
    copy = load_stable_diffusion(SHIPPED).text_encoder
    apply_new_tokens(copy, new.ids, new.rows.detach(), source="test")
    with torch.no_grad():
        assert torch.equal(out.detach(), copy(tokens))
        assert not torch.equal(out.detach(), text(tokens))                       # the base is untouched
    with pytest.raises(ValueError, match="outside the prompts"):
        new.embed(text, text.tokenize(["a red circle"]))


def _config(data, out, **kw):
    base = dict(checkpoint=str(SHIPPED), data=str(data), out=str(out), resolution=64, lr=1e-3, rank=4,
                targets="all", checkpoint_every=3, device="cpu", show_progress=False, new_tokens=True,
                cache_latents=True, batch_size=2, max_steps=6)
    return LoRARunConfig(**{**base, **kw})


def test_training_moves_the_rows_resumes_exactly_and_only_the_adapted_model_has_them(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", size=(64, 64))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_lora(_config(data, straight))
    lora = read_lora_file(straight / "lora.safetensors")
    ids, rows = lora.new_tokens
    text = load_stable_diffusion(SHIPPED).text_encoder
    start = NewTokens.start(text, trained_token_ids(SHIPPED, text, show_progress=False),
                            [prompt_for(c) for c in ("benign", "malignant")], seed=42, device="cpu")
    assert torch.equal(ids, start.ids)
    assert not torch.allclose(rows, start.rows.detach())                         # trained, not just drawn

    kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_lora(_config(data, killed))
    monkeypatch.undo()
    train_lora(_config(data, killed))                                            # resumes from step 3
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(killed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"new_tokens.ids", "new_tokens.rows"} <= set(a)

    adapted = load_model(str(SHIPPED), str(straight / "lora.safetensors"), device="cpu")
    assert torch.equal(adapted.text_encoder.token_embedding.weight[ids], rows)
    base = load_model(str(SHIPPED), device="cpu")
    assert torch.equal(base.text_encoder.token_embedding.weight, text.token_embedding.weight)
    with pytest.raises(MeddapError, match="new-token embeddings, which the diffusers"):
        write_lora_file(tmp_path / "d.safetensors", lora, "diffusers")
    assert not (tmp_path / "d.safetensors").exists()


def test_new_tokens_are_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(MeddapError, match="--fast and --new-tokens do not go together"):
        validate(_config(tmp_path, tmp_path / "o", fast=True))
    torch.manual_seed(0)
    plain = tmp_path / "plain.safetensors"                                       # no pretrain_* metadata
    save_stable_diffusion(build_stable_diffusion("tiny"), plain)
    data = write_images(tmp_path / "data", size=(64, 64))
    with pytest.raises(MeddapError, match=r"--new-tokens: the base .*plain\.safetensors does not say which "
                                          r"token rows its text tower trained"):
        train_lora(_config(data, tmp_path / "out", checkpoint=str(plain)))
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_the_batchs_contexts_backward_is_bitwise_repeatable_on_two_threads():
    """With new tokens τ(c) carries gradients to the rows. `lora_inputs` picks each row's
    context with index_select; the backward of contexts[rows] (index_put_ with accumulate)
    summed in a thread-dependent order on the CPU, and two runs of the demo's USLoRA
    training with the same seed ended with different adapters (20 repeats here differed)."""
    from types import SimpleNamespace

    from meddap.lora.train import lora_inputs
    from meddap.sampling.schedule import NoiseSchedule

    torch.set_num_threads(2)                        # the fixture sets 1 again afterwards
    g = torch.Generator().manual_seed(0)
    images = SimpleNamespace(labels=torch.randint(0, 3, (40,), generator=g), empty_row=3,
                             latents=lambda batch, vae, rng: torch.zeros(len(batch), 4, 8, 8))
    start = torch.randn(4, 77, 64, generator=g)
    upstream = torch.randn(32, 77, 64, generator=g)

    def contexts_grad() -> torch.Tensor:
        contexts = start.clone().requires_grad_(True)
        _, _, _, context = lora_inputs(None, NoiseSchedule.sd_v1(), images, contexts, torch.arange(32),
                                       torch.Generator().manual_seed(1), torch.device("cpu"),
                                       caption_dropout=0.1)
        context.backward(upstream)
        return contexts.grad

    first = contexts_grad()
    assert all(torch.equal(first, contexts_grad()) for _ in range(20))
