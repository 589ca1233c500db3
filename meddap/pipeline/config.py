"""The run config of `meddap run CONFIG`: one TOML file, read with the stdlib `tomllib`.

Each section fills the run config of the stage that uses it, so a key is the
field of that stage's command, with the same type, default and check
(declared once, in `meddap.settings` style, beside the command):

    [run]       RunSection here: name, out, seed, device
    [data]      DataSection: the split's SplitConfig (val, test, folds, max_hamming) + the data source
    [lora]      meddap.lora.train.LoRARunConfig      (`meddap train-lora`)
    [generate]  GenerateSection: meddap.data.expand.ExpandConfig (`meddap expand`) + check_images
    [fid]       meddap.fid.FidConfig                 (`meddap fid`)
    [classify]  ClassifySection: meddap.classify.train.TrainConfig (`meddap classify train`)
                + networks, gradcam_images, seeds, classic, classic_synthetic

What the pipeline fills itself is not a key: the per-fold data and output
folders, the device (from `[run] device`), the generation's checkpoint and
adapter (`[lora] checkpoint` and the fold's trained adapter), and the
prompts' paper-vs-released switch (`[lora] as_released`, used for the
training captions and the generation prompts alike).

Seeds: `[run] seed` seeds the phantom, the split, the expansion (fold k's
base seed is image_seed(seed, k)) and the check images. `[lora] seed`
defaults to 42 as in the authors' script (and `meddap train-lora`), whatever
`[run] seed` is; `[classify] seed` defaults to `[run] seed`. A config that
sets either key gets what it says.

A key that is unknown, of the wrong type or out of range is an error naming
`[section] key`, the value and what is accepted, raised before any work.
The shipped configs are in meddap/pipeline/configs/ (`meddap run --help`
lists them). Relative paths are resolved against the current folder, then,
if nothing is there, against the repository root (so the shipped configs
find `weights/tiny/` from anywhere). `[run] out` is relative to the current folder.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from meddap.classify.networks import Arch
from meddap.classify.train import TrainConfig
from meddap.data.expand import ExpandConfig
from meddap.data.splits import SplitConfig
from meddap.device import DEVICE_HELP, check_device_name
from meddap.errors import MeddapError
from meddap.fid import FeatureSpace, FidConfig
from meddap.lora.train import LoRARunConfig
from meddap.settings import above, as_dict, at_least, from_table, in_range, setting

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = Path(__file__).resolve().parent / "configs"
CLASS_NAMES = ("benign", "malignant", "normal")
DEFAULT_CHECKPOINT = "weights/sd-v1-4.safetensors"
DEFAULT_FID_WEIGHTS = "weights/pt_inception-2015-12-05-6726825d.pth"
# Settings that say where a stage runs, not what it computes: kept out of the stage hashes,
# so the same run on another device (or another rank's GPU) resumes instead of redoing.
_NOT_HASHED = ("device", "quiet", "show_progress", "barrier_timeout_s")


class DataSource(Enum):
    PHANTOM = "phantom"     # generate the BUSI-like phantom (meddap.data.phantom) into OUT/data/
    FOLDER = "folder"       # an existing class-folder dataset (BUSI layout)


def _check_counts(counts: dict) -> str | None:
    for name, n in counts.items():
        if name not in CLASS_NAMES or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return (f"has the entry {name} = {n!r}, which is not allowed; use "
                    f"{' / '.join(CLASS_NAMES)} = a whole number >= 0")
    return None


@dataclass(frozen=True, kw_only=True)
class RunSection:
    name: str = setting("run", help="the run's name (report title)")
    out: str = setting("runs/meddap", help="output folder (relative to the current folder)")
    seed: int = setting(0, check=at_least(0), help="seed of the phantom, split, expansion and check images")
    device: str | None = setting(None, check=check_device_name, help=DEVICE_HELP)
    barrier_timeout_s: float = setting(48 * 3600.0, check=above(0),
                                       help="multi-process runs: how long a rank waits for the others at a "
                                            "stage's end before every rank stops with a message")


@dataclass(frozen=True, kw_only=True)
class DataSection(SplitConfig):
    """The data stage: where the real images come from, plus the split's own settings."""
    source: DataSource = setting(DataSource.FOLDER, help="phantom: write the BUSI-like phantom; folder: BUSI layout")
    path: str = setting("data/BUSI", help="class folders (source = folder)")
    unseen: str = setting("", help="optional unseen dataset (Table 3); empty: none")
    phantom_counts: dict = setting({"benign": 437, "malignant": 210, "normal": 133}, check=_check_counts,
                                   help="images per class of the phantom (BUSI's counts)")
    phantom_size: int = setting(256, check=in_range(32, 2048), help="phantom side in pixels")
    unseen_phantom_counts: dict = setting({}, check=_check_counts, help="site b phantom per class; {} = none")


@dataclass(frozen=True, kw_only=True)
class GenerateSection(ExpandConfig):
    """`meddap expand`'s settings, plus the demo's adaptation check."""
    check_images: int = setting(0, check=at_least(0),
                                help="per class: the same prompts and seeds with and without the adapters "
                                     "(OUT/synthetic, OUT/synthetic_base); 0 = off")


@dataclass(frozen=True, kw_only=True)
class ClassifySection(TrainConfig):
    """`meddap classify train`'s settings, plus which networks and how many Grad-CAM panels."""
    networks: tuple[Arch, ...] = setting((Arch.RESNET34, Arch.SQUEEZENET1_1, Arch.DENSENET121),
                                         check=lambda v: None if v else "must name at least one network",
                                         help="classifiers trained per condition")
    gradcam_images: int = setting(6, check=at_least(0), help="Grad-CAM panels from the first test images")
    seeds: tuple[int, ...] = setting((), check=lambda v: None if all(s >= 0 for s in v) and len(set(v)) == len(v)
                                     else "must be distinct whole numbers >= 0",
                                     help="initialisation/order seeds, each cell trained once per seed with its "
                                          "own init.pt; empty: [classify] seed alone")
    classic: bool = setting(False, help="also train the classic-augmentation arm (real images, flips, rotation, "
                                        "crop, jitter) as a baseline for the synthetic conditions")
    classic_synthetic: bool = setting(False, help="also train classic augmentation on real + synthetic")

    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)


@dataclass(frozen=True)
class RunConfig:
    run: RunSection
    data: DataSection
    lora: LoRARunConfig
    generate: GenerateSection
    fid: FidConfig
    classify: ClassifySection
    source: str = ""                            # the TOML file it came from

    def section_dict(self, name: str) -> dict:
        """A section as JSON-ready values, for hashing and reports (where-it-runs keys left out)."""
        return {k: v for k, v in as_dict(getattr(self, name)).items() if k not in _NOT_HASHED}


SECTIONS = ("run", "data", "lora", "generate", "fid", "classify")


def stage_config(cls, section, **changes):
    """The stage's own config (class `cls`) from a section that extends it, with `changes`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(section).items() if k in names} | changes)


def config_from_dict(raw: dict, source: str = "") -> RunConfig:
    """Build and check a RunConfig from parsed TOML (sections of keys), before any work."""
    where = source or "config"
    for name, value in raw.items():
        if name not in SECTIONS:
            raise MeddapError(f"{where}: unknown section [{name}]; the sections are "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}.")
        if not isinstance(value, dict):
            raise MeddapError(f"{where}: [{name}] must be a table of keys.")
    t = {name: raw.get(name, {}) for name in SECTIONS}
    run = from_table(RunSection, t["run"], "run", source)
    data = from_table(DataSection, t["data"], "data", source, seed=run.seed)
    lora = from_table(LoRARunConfig, t["lora"], "lora", source, defaults={"checkpoint": DEFAULT_CHECKPOINT},
                      data="", out="", device=run.device, show_progress=True)
    generate = from_table(GenerateSection, t["generate"], "generate", source, checkpoint="", data="", out="",
                          lora=None, seed=run.seed, device=run.device, quiet=False, copy_real=False,
                          as_released=lora.as_released)
    fid = from_table(FidConfig, t["fid"], "fid", source,
                     defaults={"features": FeatureSpace.AUTO, "inception_weights": DEFAULT_FID_WEIGHTS,
                               "kid": True, "prdc": True},
                     device=run.device, quiet=False)
    classify = from_table(ClassifySection, t["classify"], "classify", source, defaults={"seed": run.seed},
                          arch=Arch.RESNET34, train=(), val="", out=Path("."), init=None,
                          device=run.device, show_progress=True)
    return RunConfig(run=run, data=data, lora=lora, generate=generate, fid=fid, classify=classify, source=source)


def read_config_toml(path: str | Path) -> tuple[dict, Path]:
    """The parsed TOML of a run config, unchecked, and its path; a bare name ("demo",
    "busi-sd14") is a shipped config. For callers that edit keys before `config_from_dict`."""
    path = Path(path)
    if not path.exists() and (SHIPPED / f"{path.name}.toml").exists():
        path = SHIPPED / f"{path.name}.toml"
    if not path.is_file():
        raise MeddapError(f"config {path} does not exist; give a TOML file or a shipped config "
                          f"({', '.join(shipped_configs())}).")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MeddapError(f"config {path} is not valid TOML: {e}.") from e


def load_config(path: str | Path) -> RunConfig:
    """Read and check a TOML run config; a bare name ("demo", "busi-sd14") is a shipped config."""
    raw, path = read_config_toml(path)
    return config_from_dict(raw, str(path))


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def resolve_path(p: str) -> Path:
    """A config path: absolute as is; relative against the current folder, else the repository root."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path
