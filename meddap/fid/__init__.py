"""FID and KID with an Inception v3 written here (equal to pytorch-fid), the
quantity of the authors' fid_calc.py (`meddap.fid.as_released`), precision/
recall/density/coverage (`meddap.fid.prdc`) and the memorisation check
(`meddap.fid.memorization`).

    from meddap.fid import FidConfig, score_sets          # the one scoring entry
    result = score_sets(FidConfig(kid=True), "data/BUSI", {"synthetic": "out/synthetic"})
    result["sets"]["synthetic"]["frechet"]                  # FID when result["is_fid"]

    from meddap.fid import inception_features, frechet_distance, kid
    feats = inception_features(images, weights="weights/pt_inception-2015-12-05-6726825d.pth")
    d2 = frechet_distance(mu1, sigma1, mu2, sigma2)

    from meddap.fid.prdc import prdc                        # precision, recall, density, coverage
    scores = prdc(real_feats, fake_feats, k=5)
    from meddap.fid.memorization import MemorizationConfig, memorization   # nearest training images
    report = memorization(MemorizationConfig(synthetic="out/synthetic", train="data/BUSI", test="data/test"))

`prdc` and `memorization` are functions of the modules of the same name, so they
are imported from those modules (an attribute `meddap.fid.prdc` is the module).

The names are imported on first use (PEP 562), so that `meddap --help`, which
imports meddap.fid.commands, does not load torch.
"""
import importlib

_EXPORTS = {
    "FidConfig": "meddap.fid.config",
    "FeatureSpace": "meddap.fid.config",
    "Formula": "meddap.fid.config",
    "score_sets": "meddap.fid.score",
    "resolve_feature_space": "meddap.fid.score",
    "pixel_extractor": "meddap.fid.pixels",
    "inception_features": "meddap.fid.inception",
    "load_fid_inception": "meddap.fid.inception",
    "FID_DIMS": "meddap.fid.config",
    "FID_WEIGHTS_FILE": "meddap.fid.inception",
    "FID_WEIGHTS_SHA256": "meddap.fid.inception",
    "FID_WEIGHTS_URL": "meddap.fid.inception",
    "frechet_distance": "meddap.fid.metrics",
    "frechet_distance_detail": "meddap.fid.metrics",
    "feature_statistics": "meddap.fid.metrics",
    "kid": "meddap.fid.metrics",
    "KID_SUBSET_SIZE": "meddap.fid.metrics",
    "per_class": "meddap.fid.metrics",
    "FrechetResult": "meddap.fid.metrics",
    "KIDResult": "meddap.fid.metrics",
    "SqrtMethod": "meddap.fid.metrics",
    "PRDC_K": "meddap.fid.prdc",
    "MemorizationConfig": "meddap.fid.memorization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meddap.fid' has no attribute {name!r}")
