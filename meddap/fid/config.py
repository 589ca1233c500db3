"""The settings of one FID scoring run (`meddap fid`, and `[fid]` of `meddap run`).

Both call meddap.fid.score.score_sets with a FidConfig, so the command and the
pipeline cannot disagree. This module imports neither torch nor the networks:
`meddap --help` and the pipeline's config loader read it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from meddap.device import DEVICE_HELP, check_device_name
from meddap.errors import MeddapError
from meddap.fid.metrics import KID_SUBSET_SIZE, KID_SUBSETS
from meddap.fid.prdc import PRDC_K
from meddap.settings import Label, at_least, cli_label, setting

# pytorch-fid's feature sizes: the Inception taps of meddap.fid.inception (its BLOCK_INDEX_BY_DIM).
FID_DIMS = (64, 192, 768, 2048)


class Formula(enum.Enum):
    STANDARD = "standard"        # FID of Heusel et al. 2017 with the TF-2015 graph (pytorch-fid)
    AS_RELEASED = "as-released"  # fid_calc.py of the MEDDAP authors (paper Table 1)


class FeatureSpace(enum.Enum):
    INCEPTION = "inception"   # the FID Inception (pytorch-fid's weights): a real FID/KID
    PIXELS = "pixels"         # substitute, NOT FID: 16x16 grey thumbnails (256-d), meddap.fid.pixels
    AUTO = "auto"             # inception when its weight file exists, else pixels (said in the result)


class SkimageResize(enum.Enum):
    """What `skimage.transform.resize(uint8_image, same_shape, order=0)` returns
    in the authors' fid_calc.py (meddap.fid.as_released, step 3).

    FLOAT_0_1: scikit-image <= 0.18 sends every resize through img_as_float, so
      the pixels are floats in [0, 1] and `/ 255` scales them a second time:
      network inputs lie in [-1, -1 + 2/255²].
    KEEP_UINT8: scikit-image >= 0.19 keeps the dtype for order 0 on integer
      images (it converts to float only `if order > 0`), so `/ 255` is the only
      scaling: inputs lie in [-1, -1 + 2/255].
    The released code does not pin scikit-image; FLOAT_0_1 is the behaviour
    described in the project's paper_facts.md ("double scaling").
    """
    FLOAT_0_1 = "0.18"
    KEEP_UINT8 = "0.19"


def check_fid_dims(dims) -> str | None:
    """A settings check: None for an Inception feature size, else the complaint."""
    if dims in FID_DIMS:
        return None
    return (f"is not an Inception feature size; accepted: {', '.join(map(str, FID_DIMS))} "
            f"(2048 is the standard FID)")


@dataclass(frozen=True, kw_only=True)
class FeaturePass:
    """How image features are computed and cached: shared by `meddap fid` and `meddap memorization`."""
    inception_weights: str | None = setting(
        None, help="weights file (empty: weights/pt_inception-2015-12-05-6726825d.pth; "
                   "as-released: weights/inception_v3_google-0cc3c7bd.pth)")
    batch_size: int = setting(50, help="images per network call", check=at_least(1))
    device: str | None = setting(None, help=DEVICE_HELP, check=check_device_name)
    cache_dir: str | None = setting(
        None, help="feature cache (empty: $XDG_CACHE_HOME/meddap/fid or ~/.cache/meddap/fid)")
    no_cache: bool = setting(False, help="neither read nor write the feature cache")
    quiet: bool = setting(False, help="no progress bars")


@dataclass(frozen=True, kw_only=True)
class FidConfig(FeaturePass):
    """One FID (or as-released) scoring run: every set against one reference set."""
    formula: Formula = setting(
        Formula.STANDARD,
        help="standard: FID as pytorch-fid; as-released: the authors' fid_calc.py quantity "
             "behind the paper's Table 1 (not an FID)")
    features: FeatureSpace = setting(
        FeatureSpace.INCEPTION,
        help="inception: the FID Inception; pixels: 16x16 grey thumbnails, a substitute that is "
             "NOT FID and needs no weights; auto: inception when its weights file exists, else pixels")
    dims: int = setting(2048, help="Inception feature size: 64, 192, 768 or 2048 (pixels: always 256)",
                        check=check_fid_dims)
    kid: bool = setting(False, help="also compute KID (unbiased, polynomial kernel)")
    kid_subsets: int = setting(KID_SUBSETS, help="KID: number of random subsets", check=at_least(1))
    kid_subset_size: int = setting(KID_SUBSET_SIZE, help="KID: images per subset (capped at the smaller set)",
                                   check=at_least(2))
    seed: int = setting(0, help="KID: seed of the subset draws")
    prdc: bool = setting(False, help="also compute precision, recall, density and coverage "
                                     "(Naeem et al. 2020, k-nearest-neighbour balls, meddap.fid.prdc)")
    prdc_k: int = setting(PRDC_K, help="PRDC: the k of the k-th nearest neighbour", check=at_least(1))
    per_class: bool = setting(False, help="also score each class present in both sets")
    as_released_skimage: SkimageResize = setting(
        SkimageResize.FLOAT_0_1,
        help="as-released: scikit-image behaviour of the nearest resize "
             "(0.18: float output, /255 twice; 0.19: uint8 kept, /255 once)")

    def cross_checks(self, label: Label = cli_label) -> None:
        if self.formula is not Formula.AS_RELEASED:
            return
        if self.dims != 2048 or self.kid:
            raise MeddapError(f"{label('formula')} = 'as-released' uses the 2048-d ImageNet average pool "
                              f"only and has no KID; drop {label('dims')} and {label('kid')}, or use "
                              f"{label('formula')} = 'standard'.")
        if self.prdc:
            raise MeddapError(f"{label('formula')} = 'as-released' has no precision/recall/density/"
                              f"coverage; drop {label('prdc')}, or use {label('formula')} = 'standard'.")
        if self.features is FeatureSpace.PIXELS:
            raise MeddapError(f"{label('formula')} = 'as-released' is defined on the ImageNet Inception's "
                              f"features and has no pixel substitute; use {label('features')} = "
                              f"'inception', or {label('formula')} = 'standard'.")
