"""The Inception v3 written here against pytorch-fid's and torchvision's, on the
same random weights (no pretrained weights exist here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fid_support import fid_state_dict, pytorch_fid_on, randomize

from meddap.errors import MeddapError
from meddap.fid import FID_WEIGHTS_SHA256, inception_features, load_fid_inception
from meddap.fid.imagenet_inception import load_imagenet_inception
from meddap.fid.inception import InceptionGraph, InceptionV3, avg_pool_valid


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    state = fid_state_dict(seed=1)
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return state, path


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_features_equal_pytorch_fid_at_all_dims(fid_weights):
    state, path = fid_weights
    images = torch.rand(3, 3, 61, 75, generator=torch.Generator().manual_seed(0))
    with pytorch_fid_on(state) as pfi:
        oracle = pfi.InceptionV3(output_blocks=[0, 1, 2, 3]).eval()   # strict load of our keys
        with torch.no_grad():
            maps = oracle(images)
    net = load_fid_inception(path)
    for dims, fmap in zip((64, 192, 768, 2048), maps):
        expected = F.adaptive_avg_pool2d(fmap, (1, 1)).flatten(1).numpy()
        ours = inception_features(images, weights=net, dims=dims, batch_size=2)
        assert ours.shape == (3, dims) and ours.dtype == np.float64
        assert rel_err(ours, expected) <= 1e-5, dims
        assert np.std(ours, axis=0).mean() > 1e-3     # random weights still separate images


def test_weights_file_keys_are_pytorch_fid_keys(fid_weights):
    state, _ = fid_weights
    with pytorch_fid_on(state) as pfi:
        torchvision_graph = pfi.fid_inception_v3()      # Inception3(num_classes=1008, aux_logits=False)
    assert set(torchvision_graph.state_dict()) == set(state)


def test_tensorflow_average_pool_ignores_padding():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = avg_pool_valid(x)
    assert y[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4      # 4 real pixels at a corner, not 9
    assert y[0, 0, 1, 1] == x[0, 0, :3, :3].mean()


def test_imagenet_graph_equals_torchvision_with_tf_pooling(tmp_path):
    """Keras' graph = torchvision's Inception3 whose A/C/E pools ignore padding
    (pytorch-fid's FIDInceptionA/C/E_1 blocks); the aux head is dropped by name."""
    import torchvision.models.inception as tvi
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1
    oracle = tvi.Inception3(num_classes=1000, aux_logits=True, init_weights=False,
                            inception_blocks=[tvi.BasicConv2d, FIDInceptionA, tvi.InceptionB,
                                              FIDInceptionC, tvi.InceptionD, FIDInceptionE_1,
                                              tvi.InceptionAux])
    state = randomize(oracle.state_dict(), seed=2)
    assert any(k.startswith("AuxLogits.") for k in state)
    oracle.load_state_dict(state)
    oracle.fc = torch.nn.Identity()                    # avg-pool output (Keras pooling='avg')
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)
    net = load_imagenet_inception(path)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = oracle.eval()(x).numpy()
    assert rel_err(net.avgpool_features(x).numpy(), expected) <= 1e-5
    assert not net.official


def test_missing_weights_file_names_file_origin_and_hash(tmp_path):
    missing = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(MeddapError) as e:
        inception_features(torch.rand(2, 3, 32, 32), weights=missing)
    msg = str(e.value)
    assert str(missing) in msg
    assert "github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in msg
    assert FID_WEIGHTS_SHA256 in msg
    with pytest.raises(MeddapError, match="download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"):
        load_imagenet_inception(tmp_path / "inception_v3_google-0cc3c7bd.pth")


def test_bad_dims_images_and_weights(fid_weights, tmp_path):
    _, path = fid_weights
    with pytest.raises(MeddapError, match="accepted: 64, 192, 768, 2048"):
        inception_features(torch.rand(2, 3, 32, 32), weights=path, dims=1000)
    with pytest.raises(MeddapError, match=r"\(N, 3, H, W\)"):
        inception_features(torch.rand(2, 1, 32, 32), weights=path)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(MeddapError, match="missing keys"):
        load_fid_inception(other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MeddapError, match="cannot be read"):
        load_fid_inception(garbage)


def test_network_stops_at_the_deepest_requested_tap():
    net = InceptionV3(InceptionGraph.FID_TF2015).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 299, 299), (64, 192))
    assert set(out) == {64, 192} and out[192].shape == (1, 192)


class _NotATensor:
    pass


def test_weight_files_are_read_with_our_own_words(tmp_path):
    """meddap.io.read_torch_state_dict (shared with the classifiers' ImageNet files):
    tensors only, and torch's paragraph about loading untrusted code is never shown."""
    from meddap.io import read_torch_state_dict
    pickled = tmp_path / "model.pth"
    torch.save({"a": _NotATensor()}, pickled)
    with pytest.raises(MeddapError) as e:
        load_fid_inception(pickled)
    msg = str(e.value)
    assert msg.startswith(f"FID Inception (TF-2015 graph, pytorch-fid port) weights file {pickled} cannot be read: "
                          f"it is not a readable torch checkpoint of tensors")
    assert "weights_only" not in msg and "pickled Python objects, which meddap does not load" in msg
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(MeddapError, match=r"holds an object of type list, not a state dict of tensors; "
                                          r"expected torchvision's x\.pth\.$"):
        read_torch_state_dict(listed, expected="torchvision's x.pth")
    numbers = tmp_path / "numbers.pth"
    torch.save({"a.weight": torch.zeros(1), "step": 3}, numbers)
    with pytest.raises(MeddapError, match="its entry 'step' is of type int"):
        read_torch_state_dict(numbers)
    truncated = tmp_path / "truncated.pth"
    torch.save({"a": torch.zeros(4)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(MeddapError, match=r"not a readable torch checkpoint \(RuntimeError: "):
        read_torch_state_dict(truncated, what="weight file")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert read_torch_state_dict(good)["w"].tolist() == [1.0, 1.0]
