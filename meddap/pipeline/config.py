"""The run config of `meddap run CONFIG`: one TOML file, read with the stdlib `tomllib`.

Every section is a small frozen dataclass whose defaults are the paper's
settings (arXiv 2403.16335; see ../shared/reference/paper_facts.md). A key that
is unknown, of the wrong type or out of range is an error naming the key, the
value and what is accepted. Two configs ship in meddap/pipeline/configs/:
`busi-sd14.toml` (the paper's protocol) and `demo.toml` (tiny base, phantoms).

Relative paths are resolved against the current folder, then, if nothing is
there, against the repository root (so the shipped configs find
`weights/tiny/` from anywhere). `[run] out` is relative to the current folder.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from meddap.data.prompts import ADJECTIVES
from meddap.errors import MeddapError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = Path(__file__).resolve().parent / "configs"


class DataSource(Enum):
    PHANTOM = "phantom"     # generate the BUSI-like phantom (meddap.data.phantom) into OUT/data/
    FOLDER = "folder"       # an existing class-folder dataset (BUSI layout)


class FeatureSpace(Enum):
    INCEPTION = "inception"   # the FID Inception (pytorch-fid's weights): a real FID/KID
    PIXELS = "pixels"         # substitute, NOT FID: 16x16 grey thumbnails (256-d), deterministic
    AUTO = "auto"             # inception when its weight file exists, else pixels (said in the report)


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    out: str = "runs/meddap"
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class DataSection:
    source: DataSource = DataSource.FOLDER
    path: str = "data/BUSI"                     # class folders (source = "folder")
    unseen: str = ""                            # optional unseen dataset (Table 3); "" = none
    phantom_counts: dict = field(default_factory=lambda: {"benign": 437, "malignant": 210, "normal": 133})
    phantom_size: int = 256
    unseen_phantom_counts: dict = field(default_factory=dict)   # site b phantom; {} = none
    folds: int = 5                              # paper: five-fold cross-validation
    val: int = 115                              # paper: 545 / 115 / 120
    test: int = 120


@dataclass(frozen=True)
class LoraSection:
    checkpoint: str = "weights/sd-v1-4.safetensors"
    rank: int = 4                               # paper Table 1: r = 4
    alpha: float = 0.0                          # 0: alpha = rank (scale 1, as released)
    targets: tuple = ("cross",)                 # ("cross",) paper, ("all",) released, or name patterns
    lr: float = 1e-4
    epochs: int = 100
    max_steps: int = 0                          # 0: no cap
    batch_size: int = 1
    resolution: int = 224
    cache_latents: bool = False
    checkpoint_every: int = 500
    as_released: bool = False


@dataclass(frozen=True)
class GenerateSection:
    adjectives: tuple = ADJECTIVES              # Table 1
    ratios: tuple = (0.5, 1.0, 2.0)             # +50%, +100%, +200% per class
    sampler: str = "pndm"                       # released: diffusers' SD v1.4 default
    steps: int = 30
    guidance: float = 7.5
    size: int = 512                             # released: 512 x 512 output
    batch_size: int = 4
    check_images: int = 0                       # per class: adapted vs unadapted check (demo); 0 = off


@dataclass(frozen=True)
class FidSection:
    features: FeatureSpace = FeatureSpace.AUTO
    inception_weights: str = "weights/pt_inception-2015-12-05-6726825d.pth"
    kid: bool = True


@dataclass(frozen=True)
class ClassifySection:
    networks: tuple = ("resnet34", "squeezenet1.1", "densenet121")
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    size: int = 224
    gradcam_images: int = 6                     # per run: Grad-CAM panels from the first test images


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    fid: FidSection = field(default_factory=FidSection)
    classify: ClassifySection = field(default_factory=ClassifySection)
    source: str = ""                            # the TOML file it came from

    def section_dict(self, name: str) -> dict:
        """A section as JSON-ready values (enums by value), for hashing and reports."""
        return {k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(getattr(self, name)).items()}


SECTIONS = {"run": RunSection, "data": DataSection, "lora": LoraSection, "generate": GenerateSection,
            "fid": FidSection, "classify": ClassifySection}
SAMPLERS = ("ddim", "pndm", "ddpm")
CLASS_NAMES = ("benign", "malignant", "normal")


def _convert(where: str, key: str, value, default):
    """value -> the type of `default`, or a MeddapError naming `[where] key`."""
    name = f"[{where}] {key}"
    if isinstance(default, Enum):
        allowed = [m.value for m in type(default)]
        if value not in allowed:
            raise MeddapError(f"{name} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}.")
        return type(default)(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise MeddapError(f"{name} = {value!r} must be true or false.")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise MeddapError(f"{name} = {value!r} must be a whole number.")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MeddapError(f"{name} = {value!r} must be a number.")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise MeddapError(f"{name} = {value!r} must be a string.")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise MeddapError(f"{name} = {value!r} must be a list, e.g. {list(default)!r}.")
        return tuple(value)
    if not isinstance(value, dict):
        raise MeddapError(f"{name} = {value!r} must be a table, e.g. {{benign = 10, malignant = 10}}.")
    return dict(value)


def _check_range(key: str, value, low, high=None, what: str = "") -> None:
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise MeddapError(f"{key} = {value!r} is out of range; use a value {bound}{what}.")


def _validate(cfg: RunConfig) -> None:
    """Checks across keys and ranges (types are checked while reading)."""
    from meddap.classify.networks import Arch

    d, lo, g, c = cfg.data, cfg.lora, cfg.generate, cfg.classify
    _check_range("[data] folds", d.folds, 1, 10)
    _check_range("[data] val", d.val, 1)
    _check_range("[data] test", d.test, 1)
    _check_range("[data] phantom_size", d.phantom_size, 32, 2048)
    for key, counts in (("phantom_counts", d.phantom_counts), ("unseen_phantom_counts", d.unseen_phantom_counts)):
        for name, n in counts.items():
            if name not in CLASS_NAMES or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise MeddapError(f"[data] {key} entry {name} = {n!r} is not allowed; use "
                                  f"{' / '.join(CLASS_NAMES)} = a whole number >= 0.")
    _check_range("[lora] rank", lo.rank, 1, 1024)
    _check_range("[lora] lr", lo.lr, 1e-8, 1.0)
    for key in ("epochs", "batch_size", "checkpoint_every"):
        _check_range(f"[lora] {key}", getattr(lo, key), 1)
    if not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise MeddapError(f"[lora] targets = {list(lo.targets)!r} must be \"cross\", \"all\" or a list of "
                          f"module-name patterns such as [\"attn2.to_q\", \"ff.net.*\"].")
    for key, size in (("[lora] resolution", lo.resolution), ("[generate] size", g.size)):
        if size < 8 or size % 8:
            raise MeddapError(f"{key} = {size} must be a positive multiple of 8 (the VAE downsamples by 8).")
    if g.sampler not in SAMPLERS:
        raise MeddapError(f"[generate] sampler = {g.sampler!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, SAMPLERS))}.")
    _check_range("[generate] steps", g.steps, 1, 1000)
    _check_range("[generate] guidance", g.guidance, 0.0, 100.0)
    _check_range("[generate] batch_size", g.batch_size, 1)
    _check_range("[generate] check_images", g.check_images, 0)
    if not g.ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in g.ratios):
        raise MeddapError(f"[generate] ratios = {list(g.ratios)!r} must be a non-empty list of numbers > 0, "
                          f"e.g. [0.5, 1.0, 2.0] (the paper's +50%, +100%, +200%).")
    if not g.adjectives or not all(isinstance(a, str) and a for a in g.adjectives):
        raise MeddapError(f"[generate] adjectives = {list(g.adjectives)!r} must be a non-empty list of words, "
                          f"e.g. [\"none\", \"dark\"].")
    allowed = [a.value for a in Arch]
    for net in c.networks:
        if net not in allowed:
            raise MeddapError(f"[classify] networks entry {net!r} is not allowed; choose from "
                              f"{', '.join(map(repr, allowed))}.")
    for key in ("epochs", "batch_size", "size"):
        _check_range(f"[classify] {key}", getattr(c, key), 1)
    _check_range("[classify] lr", c.lr, 1e-8, 1.0)
    _check_range("[classify] gradcam_images", c.gradcam_images, 0)


def config_from_dict(raw: dict, source: str = "") -> RunConfig:
    """Build and validate a RunConfig from parsed TOML (sections of keys)."""
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise MeddapError(f"{source or 'config'}: unknown section [{name}]; the sections are "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}.")
        if not isinstance(value, dict):
            raise MeddapError(f"{source or 'config'}: [{name}] must be a table of keys.")
        cls = SECTIONS[name]
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, v in value.items():
            if key not in defaults:
                raise MeddapError(f"{source or 'config'}: unknown key [{name}] {key}; the keys of [{name}] are "
                                  f"{', '.join(defaults)}.")
            kwargs[key] = _convert(name, key, v, defaults[key])
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections, source=source)
    _validate(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run config; a bare name ("demo", "busi-sd14") is a shipped config."""
    path = Path(path)
    if not path.exists() and (SHIPPED / f"{path.name}.toml").exists():
        path = SHIPPED / f"{path.name}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml")))
        raise MeddapError(f"config {path} does not exist; give a TOML file or a shipped config ({shipped}).")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MeddapError(f"config {path} is not valid TOML: {e}.") from e
    return config_from_dict(raw, str(path))


def resolve_path(p: str) -> Path:
    """A config path: absolute as is; relative against the current folder, else the repository root."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path
