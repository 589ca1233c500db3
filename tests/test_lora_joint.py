"""All folds in one pass (meddap.lora.joint): each fold gets what training it alone gives."""
import dataclasses

import numpy as np
import pytest
import torch

from meddap.errors import MeddapError
from meddap.lora.adapter import LoRALinear
from meddap.lora.joint import MultiLoRALinear, train_lora_joint
from meddap.lora.train import MixedPrecision, train_lora
from test_lora_train import adapters, config, files, one_thread, write_images  # noqa: F401

# Joint and separate runs agree to float32 rounding only: the UNet runs on the batch of
# all folds, whose kernels round otherwise than a batch of one. The tiny random UNet
# amplifies that rounding (its output moves by ~5e-4 relative, its input gradient by
# ~0.3, between a batch of 3 and three batches of 1), and AdamW's first steps, which
# move each weight by about ±lr whatever the gradient's size, pass it on to the adapters.
# Measured on the CPU (3 folds, 12 + 12 + 8 steps at lr 1e-3): first losses equal as
# logged (6 digits), all losses to 2.5e-3 relative, adapters (all weights of a fold as
# one vector) to 1.4e-2 relative. The bounds below are about 3x those.
FIRST_LOSS_RTOL = 1e-5
LOSS_RTOL = 1e-2
ADAPTER_RTOL = 5e-2


def log_rows(out):
    return [r.split(",") for r in (out / "log.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    """A fold of 4 images of 64 x 80 px: fewer steps per epoch, so it ends first."""
    return write_images(tmp_path_factory.mktemp("third") / "data", size=(64, 80), per_class=2)


def fold_configs(files, third, root, **kw):
    data = [files / "tall", files / "square", third]
    return [config(files, root / f"fold{k}", data=str(d), seed=10 + k, epochs=2, checkpoint_every=5, **kw)
            for k, d in enumerate(data)]


def flat(weights):
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5])
def test_joint_folds_equal_separate_runs(files, third, tmp_path, caption_dropout):
    separate = fold_configs(files, third, tmp_path / "separate", caption_dropout=caption_dropout)
    joint = fold_configs(files, third, tmp_path / "joint", caption_dropout=caption_dropout)
    for cfg in separate:
        train_lora(cfg)
    paths = train_lora_joint(joint)
    assert paths == [tmp_path / "joint" / f"fold{k}" / "lora.safetensors" for k in range(3)]
    first, worst_loss, worst_adapters = 0.0, 0.0, 0.0
    for k in range(3):
        a, b = tmp_path / "separate" / f"fold{k}", tmp_path / "joint" / f"fold{k}"
        rows_a, rows_b = log_rows(a), log_rows(b)
        assert [r[:2] for r in rows_a] == [r[:2] for r in rows_b] and len(rows_a) == (8 if k == 2 else 12)
        la, lb = (np.array([float(r[2]) for r in rows]) for rows in (rows_a, rows_b))
        first = max(first, abs(la[0] - lb[0]) / la[0])
        worst_loss = max(worst_loss, float(np.max(np.abs(la - lb) / la)))
        sa, sb = (torch.load(x / "train_state.pt", weights_only=True) for x in (a, b))
        assert torch.equal(sa["rng"]["loop"], sb["rng"]["loop"])   # exactly the same draws
        assert torch.equal(sa["order"], sb["order"]) and sa["step"] == sb["step"]
        A, B = adapters(a), adapters(b)
        assert A.keys() == B.keys()
        worst_adapters = max(worst_adapters, ((flat(A) - flat(B)).norm() / flat(A).norm()).item())
        assert any(A[k].abs().max() > 0 for k in A if k.endswith("lora_up"))   # trained, not zeros
    print(f"joint vs separate: first losses {first:.3g}, losses {worst_loss:.3g}, adapters {worst_adapters:.3g}")
    assert first <= FIRST_LOSS_RTOL and worst_loss <= LOSS_RTOL and worst_adapters <= ADAPTER_RTOL


def test_a_fold_is_untouched_by_the_other_folds_data(files, third, tmp_path):
    """Fold 0 bit for bit, whatever the other folds' seeds: rows share no adapter and no loss."""
    one = fold_configs(files, third, tmp_path / "one")
    other = [c if k == 0 else dataclasses.replace(c, seed=c.seed + 100)
             for k, c in enumerate(fold_configs(files, third, tmp_path / "other"))]
    train_lora_joint(one)
    train_lora_joint(other)
    one, other = tmp_path / "one", tmp_path / "other"
    A, B = adapters(one / "fold0"), adapters(other / "fold0")
    assert all(torch.equal(A[k], B[k]) for k in A)
    assert (one / "fold0" / "log.csv").read_bytes() == (other / "fold0" / "log.csv").read_bytes()
    assert not torch.equal(flat(adapters(one / "fold1")), flat(adapters(other / "fold1")))   # they did change


def test_joint_run_resumes_each_fold(files, third, tmp_path):
    straight = fold_configs(files, third, tmp_path / "straight")
    train_lora_joint(straight)
    resumed = fold_configs(files, third, tmp_path / "resumed")
    train_lora_joint([dataclasses.replace(c, max_steps=5) for c in resumed])
    train_lora_joint(resumed)
    for k in range(3):
        A, B = adapters(tmp_path / "straight" / f"fold{k}"), adapters(tmp_path / "resumed" / f"fold{k}")
        assert all(torch.equal(A[n], B[n]) for n in A)
        assert (tmp_path / "straight" / f"fold{k}" / "log.csv").read_bytes() == \
            (tmp_path / "resumed" / f"fold{k}" / "log.csv").read_bytes()


def test_multi_lora_rows_use_their_own_folds_adapters():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    folds = [LoRALinear(base, 2, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for m in folds:
        torch.nn.init.normal_(m.lora_up)
    multi = MultiLoRALinear(folds)
    x = torch.randn(3, 4, 6)                                      # (B, N, k)
    multi.rows = torch.tensor([1, 0, 1])
    y = multi(x)                                                   # (B, N, d)
    for b, f in enumerate([1, 0, 1]):
        torch.testing.assert_close(y[b], folds[f](x[b]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(lr=5e-4), r"^fold 1 \(.*fold1\) differs from fold 0 in: lr; the folds of one joint run share every "
                    r"setting but data, out, seed\.$"),
    (dict(out="same"), r"^the folds of one joint run need distinct output folders"),
])
def test_joint_folds_must_share_their_settings(files, third, tmp_path, change, match):
    cfgs = fold_configs(files, third, tmp_path)
    if "out" in change:
        cfgs = [dataclasses.replace(c, out=str(tmp_path / "same")) for c in cfgs]
    else:
        cfgs[1] = dataclasses.replace(cfgs[1], **change)
    with pytest.raises(MeddapError, match=match):
        train_lora_joint(cfgs)
    assert not any((tmp_path / f"fold{k}").exists() for k in range(3))


def test_joint_refuses_what_it_does_not_do(files, third, tmp_path):
    cfgs = [dataclasses.replace(c, validate_every=2) for c in fold_configs(files, third, tmp_path)]
    with pytest.raises(MeddapError, match=r"^--validate-every = 2 is not supported when training folds "
                                          r"jointly; train the folds one by one \(meddap train-lora\) for it\.$"):
        train_lora_joint(cfgs)
    cfgs = [dataclasses.replace(c, validate_every=0, mixed_precision=MixedPrecision.FP16) for c in cfgs]
    with pytest.raises(MeddapError, match=r"^--mixed-precision = 'fp16' is not supported when training"):
        train_lora_joint(cfgs)
    cfgs = [dataclasses.replace(c, mixed_precision=MixedPrecision.NO, new_tokens=True) for c in cfgs]
    with pytest.raises(MeddapError, match=r"^--new-tokens = True is not supported when training"):
        train_lora_joint(cfgs)
