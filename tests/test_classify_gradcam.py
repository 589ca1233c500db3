"""Grad-CAM: hooks agree with an explicit autograd computation on all three
networks (DenseNet's in-place ReLU included), maps have the input's size, and
on a toy problem the map peaks on the planted discriminative patch."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meddap.classify.gradcam import GradCAM, jet, overlay, panel
from meddap.classify.networks import Arch, build_network


def _split_forward(net: nn.Module, arch: Arch, x: torch.Tensor):
    """(A, logits) with A the target layer's output, by torchvision's forward
    written out by hand (no hooks, no in-place ops on A)."""
    if arch is Arch.RESNET34:
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        a = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return a, net.fc(torch.flatten(net.avgpool(a), 1))
    a = net.features(x)
    if arch is Arch.SQUEEZENET1_1:
        return a, torch.flatten(net.classifier(a), 1)
    return a, net.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(a), 1), 1))


@pytest.mark.parametrize("arch", list(Arch))
def test_hooks_equal_explicit_gradcam(arch):
    torch.manual_seed(0)
    net = build_network(arch, 3).eval()
    x = torch.randn(2, 3, 64, 64)                   # maps of 2x2 (3x3 for SqueezeNet)
    a, logits = _split_forward(net, arch, x)
    classes = logits.argmax(1)
    grad, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), a)   # (B, K, h, w)
    ref = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))   # Eq. 1-2
    assert bool((ref.flatten(1).amax(1) > 0).all())                            # a non-trivial map
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ref = ref / ref.flatten(1).amax(1)[:, None, None]

    cam_engine = GradCAM(net, arch.spec.gradcam_layer)
    cams, hooked_logits = cam_engine(x)                                         # predicted class
    assert cams.shape == (2, 64, 64)
    assert float(cams.min()) >= 0.0 and float(cams.amax()) == pytest.approx(1.0)
    torch.testing.assert_close(hooked_logits, logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cams, ref.detach(), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in net.parameters())          # no side effect on .grad
    cam_engine.remove()
    with torch.no_grad():                                        # hook removed: plain model
        torch.testing.assert_close(net(x), logits.detach(), rtol=1e-5, atol=1e-5)


class _ResNetStem(nn.Module):
    """A small subset of torchvision's ResNet34 (stem + layer1, same module
    names) with a GAP + linear head: cheap to train on CPU."""

    def __init__(self):
        super().__init__()
        r = build_network(Arch.RESNET34, 2)
        self.conv1, self.bn1, self.relu, self.maxpool, self.layer1 = (
            r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):                                       # x (B, 3, 64, 64)
        a = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))      # (B, 64, 16, 16)
        return self.fc(a.mean((2, 3)))


def _patches(n, size, patch, gen):
    """Noise images; odd-indexed ones (class 1) carry a bright square at a random place."""
    x = torch.randn(n, 3, size, size, generator=gen) * 0.5
    y = torch.arange(n) % 2
    corners = []
    for i in range(n):
        r, c = torch.randint(0, size - patch, (2,), generator=gen).tolist()
        if y[i] == 1:
            x[i, :, r:r + patch, c:c + patch] += 2.0
        corners.append((r, c))
    return x, y, corners


def test_gradcam_peaks_on_planted_patch():
    size, patch = 64, 12
    torch.manual_seed(0)
    net = _ResNetStem()
    gen = torch.Generator().manual_seed(0)
    x, y, _ = _patches(24, size, patch, gen)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        net.train()
        perm = torch.randperm(24, generator=gen)
        for b in range(0, 24, 16):
            idx = perm[b:b + 16]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xt, yt, corners = _patches(12, size, patch, torch.Generator().manual_seed(1))
    cams, logits = GradCAM(net, "layer1")(xt, torch.ones(12, dtype=torch.long))
    assert cams.shape == (12, size, size)
    assert float((logits.argmax(1) == yt).double().mean()) >= 0.75
    for i in np.flatnonzero(yt.numpy() == 1):
        r, c = corners[i]
        pr, pc = divmod(int(cams[i].argmax()), size)
        assert r <= pr < r + patch and c <= pc < c + patch, (corners[i], (pr, pc))


def test_jet_and_overlay_and_panel():
    assert jet(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    image = np.full((8, 8, 3), 100, np.uint8)
    blended = overlay(image, np.zeros((8, 8)), alpha=0.5)
    assert blended[0, 0].tolist() == [50, 50, 114]                  # (100 + (0, 0, 128)) / 2
    assert panel(image, [("a", np.zeros((8, 8))), ("b", np.ones((8, 8)))]).size == (24, 8 + 26)
