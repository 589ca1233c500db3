"""Scoring a trained classifier on a labelled dataset (MEDDAP Tables 2-3).

Classes are matched by NAME between the model (its training classes) and
the data. The data may hold a subset of the model's classes: the 3-class
BUSI model (benign, malignant, normal) scored on Dataset B (benign,
malignant), as in the paper's Table 3. Then:

- the model still chooses among all k classes (argmax over k logits); a
  prediction of a class the data lacks ("normal" on Dataset B) is an error;
  it is a false negative of the true class and lowers accuracy;
- the macro means average over the data's classes only (benign, malignant),
  so the absent class adds no 0/0 = 0 rows (`labels` in metrics.py);
- the confusion matrix stays k x k (the absent class's row is zero).

A data class the model does not know is an error: the model cannot be right
on it, so the score would mean nothing.

Bootstrap 95% confidence intervals (1000 resamples of the test images,
seeded) come with every metric; they describe test-set sampling only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from meddap.classify.metrics import METRIC_NAMES, bootstrap_ci, calibration, compute_metrics
from meddap.classify.networks import network_from_state, parse_arch
from meddap.classify.train import Compute, predict, to_tensor_set
from meddap.data.datasets import resolve_images
from meddap.device import resolve_device
from meddap.errors import MeddapError
from meddap.io import sha256_file

CROSS_DATASET_RULE = ("classes matched by name; predictions of a model class absent from the "
                      "data count as errors; macro means over the data's classes")


def best_checkpoint(model: str | Path) -> Path:
    """A training output folder (its best.pt) or a best.pt file."""
    path = Path(model)
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise MeddapError(f"no classifier at {model}: expected a `meddap classify train` output "
                          f"folder holding best.pt, or a best.pt file.")
    return path


def load_classifier(model: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, metadata: arch, classes, size, ...)."""
    path = best_checkpoint(model)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        arch, classes = parse_arch(blob["arch"]), list(blob["classes"])
    except MeddapError:
        raise
    except Exception as e:
        raise MeddapError(f"{path} is not a meddap classifier checkpoint "
                          f"({type(e).__name__}: {e}).") from e
    net = network_from_state(arch, len(classes), blob["state_dict"])
    net.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["path"], meta["sha256"] = str(path), sha256_file(path)
    return net, meta


def evaluate(model: str | Path, data: str, device: str | None = None, batch_size: int = 64,
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of the classifier `model` on `data` (folder or SPLIT.json:FOLD:PART);
    `device` follows meddap.device's rule (None: this process's GPU if any, else cpu)."""
    device = resolve_device(device)
    net, meta = load_classifier(model, device)
    model_classes = list(meta["classes"])
    image_set = resolve_images(data)
    unknown = [c for c in image_set.classes if c not in model_classes]
    if unknown:
        raise MeddapError(f"data {data} has class(es) {unknown} that the model {meta['path']} "
                          f"was not trained on; it knows {model_classes}.")
    if not image_set.items:
        raise MeddapError(f"data {data} holds no images.")
    tensors = to_tensor_set([image_set], model_classes, int(meta["size"]))
    logits = predict(net, tensors.images, batch_size, Compute.on(device))      # (N, k)
    y_pred = logits.argmax(1).cpu().numpy()
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy()                 # (N, k)
    y_true = tensors.labels.numpy()
    labels = [model_classes.index(c) for c in image_set.classes]
    k = len(model_classes)
    result = {
        "model": meta["path"], "model_sha256": meta["sha256"], "arch": meta["arch"],
        "imagenet_init": bool(meta["imagenet_init"]), "data": str(data),
        "model_classes": model_classes, "data_classes": list(image_set.classes),
        "scoring": CROSS_DATASET_RULE,
        **compute_metrics(y_true, y_pred, k, labels=labels, class_names=model_classes),
        "ci95": bootstrap_ci(y_true, y_pred, k, labels=labels, n_boot=n_boot, seed=seed),
        **calibration(y_true, probs),                   # ECE (15 bins), Brier, reliability bins
        "bootstrap": {"resamples": n_boot, "seed": seed, "method": "percentile"},
        "predictions": [{"path": p, "true": model_classes[t], "pred": model_classes[q]}
                        for p, t, q in zip(tensors.paths, y_true, y_pred)],
    }
    return result


def format_report(result: dict) -> str:
    """A short text table of one evaluation."""
    init = "ImageNet init" if result["imagenet_init"] else "random init (no ImageNet weights)"
    lines = [f"{result['arch']} ({init}) on {result['data']}: {result['n']} images, "
             f"classes {result['data_classes']}"]
    for m in METRIC_NAMES:
        lo, hi = result["ci95"][m]
        lines.append(f"  {m:<12} {100 * result[m]:6.2f}%   95% CI [{100 * lo:.2f}, {100 * hi:.2f}]")
    lines.append("  confusion (rows true, columns predicted: " + ", ".join(result["model_classes"]) + ")")
    lines += ["    " + " ".join(f"{v:5d}" for v in row) for row in result["confusion"]]
    return "\n".join(lines)
