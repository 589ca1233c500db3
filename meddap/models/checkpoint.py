"""Reading SD v1 weight files safely, and telling what is in them.

Formats (all give tensors under the original CompVis checkpoint names):
  * `.safetensors`: memory-mapped; a tensor is a view into the file until a
    loader copies it (then its pages are handed back, see `Checkpoint.take`).
    meddap reads and writes this format itself, not with the `safetensors`
    library: the library cannot hand a tensor's pages back while converting
    tensor by tensor, so loading an fp32 file to fp16 would hold the whole file
    and the converted model at once (tests/test_models_loading.py,
    test_fp16_load_of_fp32_file_stays_within_1_5x_file_size, guards the peak).
    `read_safetensors` and `write_safetensors` serve every other file (adapters).
  * `.ckpt` / `.pt` / `.pth` / `.bin`: torch pickles, read only through
    torch's weights-only unpickler (never the unrestricted one). Legacy SD
    files pickle `pytorch_lightning` objects (e.g. a ModelCheckpoint callback
    as a dict key); each such class is replaced by an inert stand-in, so
    Lightning is neither needed nor imported and no code from the file runs.
    Any other global that is not a tensor or container type is refused.
  * a diffusers folder (`unet/`, `vae/`, `text_encoder/`), renamed by
    meddap.models.diffusers_names.

Then `detect_family` tells SD v1 from SD 2.x and SDXL, `check_keys` lists
missing, mis-shaped, optional and unexpected keys per network, and
`compare_schedule` compares stored schedule buffers with meddap's.
"""
from __future__ import annotations

import json
import math
import mmap
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meddap.errors import MeddapError
from meddap.io import atomic_path
from meddap.models import diffusers_names

# Checkpoint prefixes of the three networks (CompVis LatentDiffusion attribute paths).
PREFIXES = {"unet": "model.diffusion_model.",
            "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer.text_model."}
# Tensors some SD v1 files carry and some do not (reference sd_v1_checkpoint_keys.json
# "optional"): LatentDiffusion's schedule buffers, its `logvar`, EMA scalars and CLIP's position ids.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
OPTIONAL = frozenset(SCHEDULE_BUFFERS + ("logvar", "model_ema.decay", "model_ema.num_updates",
                                         PREFIXES["text_encoder"] + "embeddings.position_ids"))
# EMA copies of the UNet (`sd-v1-4-full-ema.ckpt`: `model_ema.diffusion_modelinput_blocks00weight`, ...)
# are accepted and not loaded: like CompVis v1-inference.yaml (use_ema: False) and diffusers'
# conversion (extract_ema=False) we load `model.diffusion_model.*`.
IGNORED_PREFIX = "model_ema."
# Pickled classes replaced by inert stand-ins (the training framework of SD v1).
LIGHTNING_MODULES = ("pytorch_lightning", "lightning")
# Plain-data numpy constructors some Lightning checkpoints pickle (scores as numpy scalars).
NUMPY_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100_000_000   # safetensors' own limit on the JSON header, in bytes
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_FILES = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
                   "text_encoder": ("text_encoder", "model")}


@dataclass
class Checkpoint:
    """Tensors of one SD file or folder, under CompVis checkpoint names."""
    path: Path
    tensors: dict[str, torch.Tensor]
    files: list[Path]                                   # the weight files read
    _pages: dict[str, tuple[mmap.mmap, int, int]] = field(default_factory=dict, repr=False)

    def take(self, name: str, device, dtype: torch.dtype | None) -> torch.Tensor:
        """Remove a tensor and return it on `device` in `dtype` (None: keep its dtype).

        A memory-mapped tensor is copied and its file pages are dropped from
        RAM right away, so converting fp32 -> fp16 never holds the whole file
        and the converted model at once.
        """
        t = self.tensors.pop(name)
        if name not in self._pages:
            return t.to(device=device, dtype=dtype)
        out = t.to(device=device, dtype=dtype, copy=True)
        mm, start, length = self._pages.pop(name)
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + length) // page * page   # whole pages inside
        if hi > lo and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return out


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of an SD file or diffusers folder, under CompVis names (safe; mmap for safetensors)."""
    return open_checkpoint(path).tensors


def open_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise MeddapError(f"checkpoint {path} does not exist; give a .ckpt, .safetensors or diffusers folder.")
    if path.is_dir():
        return _open_diffusers_folder(path)
    if path.suffix == ".safetensors":
        tensors, pages, _ = _map_safetensors(path)
        return Checkpoint(path, tensors, [path], pages)
    if path.suffix in PICKLE_SUFFIXES:
        return Checkpoint(path, _unwrap(_load_pickle(path), path), [path])
    raise MeddapError(f"{path}: unknown checkpoint type {path.suffix!r}; accepted: .safetensors, "
                      f"{', '.join(PICKLE_SUFFIXES)} or a diffusers folder with unet/, vae/, text_encoder/.")


# ---- safetensors ---------------------------------------------------------------------
def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file as ordinary CPU tensors (copied out of the
    map, so they outlive it), and its `__metadata__` ({} if it has none)."""
    tensors, _, metadata = _map_safetensors(Path(path))
    return {name: t.clone() for name, t in tensors.items()}, metadata


def _map_safetensors(path: Path) -> tuple[dict, dict, dict[str, str]]:
    """Parse a safetensors header and map the file (copy-on-write: the file is never written).

    Layout: 8-byte little-endian header length N, N bytes of JSON
    {"__metadata__": {str: str} (optional), name: {dtype, shape, data_offsets: [begin, end]}},
    then the data. The header is untrusted input: anything but that flat form is a MeddapError.
    Returns the tensors (views into the map), their pages for `Checkpoint.take`, and the metadata.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise MeddapError(f"{path}: not a safetensors file, or truncated (its header length "
                              f"{n} does not fit in {size} bytes).")
        try:
            header = json.loads(f.read(n))
        except RecursionError:   # a flat header nests 3 deep; this one overflows the parser's stack
            raise MeddapError(f"{path}: the header is not a flat safetensors header (its JSON is nested "
                              f"too deep); the file is damaged or not a safetensors file.") from None
        except ValueError as e:  # JSON and UTF-8 errors, and integers over Python's 4300 digits
            raise MeddapError(f"{path}: the safetensors header is not valid JSON ({e}); "
                              f"the file is damaged or not a safetensors file.") from None
        if not isinstance(header, dict):
            raise MeddapError(f"{path}: the safetensors header is not a JSON object; the file is damaged.")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise MeddapError(f"{path}: the header's __metadata__ is not an object of strings "
                          f"({metadata!r:.80}); the file is damaged.")
    tensors, pages = {}, {}
    for name, info in header.items():
        dtype, shape, begin, end = _header_entry(path, name, info)
        count = math.prod(shape)
        start = 8 + n + begin
        if 8 + n + end > size:
            raise MeddapError(f"{path}: tensor {name} ends at byte {8 + n + end} but the file has "
                              f"{size} bytes; the file is truncated (an interrupted download or copy?).")
        if end - begin != count * dtype.itemsize:
            raise MeddapError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} "
                              f"of {info['dtype']}; the file is damaged.")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():             # ACCESS_COPY maps are writable; nothing to warn about
            warnings.simplefilter("ignore")
            tensors[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=start).view(shape)
        pages[name] = (mm, start, end - begin)
    ends = [info["data_offsets"][1] for info in header.values()]
    if max(ends, default=0) != size - 8 - n:   # safetensors' own rule: the data fills the file exactly
        raise MeddapError(f"{path}: the header's tensors cover {max(ends, default=0)} bytes of data but the "
                          f"file has {size - 8 - n} after its header; the file is damaged.")
    return tensors, pages, metadata


def _header_entry(path: Path, name: str, info) -> tuple[torch.dtype, list[int], int, int]:
    """dtype, shape and data offsets [begin, end) of one safetensors header entry, checked:
    {"dtype": one of SAFETENSORS_DTYPES, "shape": [int >= 0, ...], "data_offsets": [begin, end]}
    with integers 0 <= begin <= end (true integers: no floats, strings or booleans), and a
    shape whose strides fit torch's int64 (even an empty tensor computes them)."""
    def is_count(x) -> bool:
        return type(x) is int and x >= 0

    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] and math.prod(max(d, 1) for d in shape) < 2 ** 63):
        raise MeddapError(f"{path}: the header entry of tensor {name} is malformed ({info!r:.80}); "
                          f"the file is damaged.")
    code = info.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise MeddapError(f"{path}: tensor {name} has dtype {code!r:.40}; "
                          f"meddap reads {', '.join(SAFETENSORS_DTYPES)}.")
    return dtype, shape, offsets[0], offsets[1]


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically, tensor by tensor (no second copy of the data in RAM)."""
    names = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if t.dtype not in names:
            raise MeddapError(f"{path}: tensor {name} has dtype {t.dtype}; safetensors files hold "
                              f"{', '.join(str(dt) for dt in names)}.")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                 # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


# ---- torch pickles -------------------------------------------------------------------
class PickledObjectStandIn:
    """Inert replacement for a pickled training-framework object: it stores what
    the pickle gives it and does nothing else."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _allow(full_name: str, path: Path) -> list[tuple[object, str]]:
    """What a pickled global may become: an inert stand-in for a Lightning class, numpy's
    plain-data scalar/dtype constructors, or nothing (a refusal naming the global)."""
    if full_name.split(".")[0] in LIGHTNING_MODULES:
        module, _, name = full_name.rpartition(".")
        return [(type(name, (PickledObjectStandIn,), {"__module__": module}), full_name)]
    if full_name in NUMPY_GLOBALS:
        import numpy
        if full_name != "numpy.dtype":
            return [((getattr(numpy, "_core", None) or numpy.core).multiarray.scalar, full_name)]
        # numpy >= 1.25 builds a dtype as an instance of its per-type class (numpy.dtypes.Float64DType)
        kinds = [type(numpy.dtype(code)) for code in "?bhilqBHILQefd"]
        return [(numpy.dtype, full_name)] + [(k, f"numpy.dtypes.{k.__name__}") for k in kinds]
    raise MeddapError(f"{path}: refused: its pickle refers to {full_name}, which is not a tensor, "
                      f"container or pytorch_lightning class; loading it could run code from the "
                      f"file. Use a .safetensors copy from a trusted source.")


def _load_pickle(path: Path):
    """torch.load(weights_only=True) with Lightning classes allowed as stand-ins.

    Zip-format files are scanned for globals first (nothing is loaded before a
    refusal); torch's weights-only unpickler then names any global the scan
    could not see (and every global of legacy, non-zip files), one per attempt.
    """
    allowed = {}
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:                 # is_zipfile raises on some damaged end records
        raise MeddapError(f"{path}: cannot read this torch zip archive ({e}); the file is "
                          f"truncated or damaged.") from None
    if is_zip:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:                      # a damaged archive raises several types
            raise MeddapError(f"{path}: cannot read this torch zip archive ({e}); the file is "
                              f"truncated or damaged.") from None
        allowed = {name: _allow(name, path) for name in sorted(unsafe)}
    while True:
        try:
            with torch.serialization.safe_globals([g for entries in allowed.values() for g in entries]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            if found and found.group(1) not in allowed:
                allowed[found.group(1)] = _allow(found.group(1), path)
                continue
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise MeddapError(f"{path}: cannot read this torch file ({detail}); it is truncated, "
                              f"damaged or not a torch checkpoint.") from None
        except Exception as e:                      # the unpickler raises many types on damaged bytes
            raise MeddapError(f"{path}: cannot read this torch file ({type(e).__name__}: "
                              f"{str(e).split('. ')[0] if str(e) else 'no detail'}); it is truncated, "
                              f"damaged or not a torch checkpoint.") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict of a .ckpt: Lightning files nest it under `state_dict`."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MeddapError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
                          f"this is not a Stable Diffusion checkpoint.")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MeddapError(f"{path}: entries {bad[:3]} are not tensors; expected a state dict "
                          f"(optionally under 'state_dict').")
    return dict(obj)


# ---- diffusers folders ---------------------------------------------------------------
def _component_file(folder: Path, component: str) -> Path:
    sub, stem = DIFFUSERS_FILES[component]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise MeddapError(f"diffusers folder {folder}: no {sub}/{stem}.safetensors (or .fp16.safetensors, "
                      f".bin); a diffusers SD folder has unet/, vae/ and text_encoder/ weights.")


def _open_diffusers_folder(folder: Path) -> Checkpoint:
    tensors, pages, files = {}, {}, []
    for component, prefix in PREFIXES.items():
        file = _component_file(folder, component)
        files.append(file)
        if file.suffix == ".safetensors":
            part, part_pages, _ = _map_safetensors(file)
        else:
            part, part_pages = _unwrap(_load_pickle(file), file), {}
        if component == "text_encoder":
            names = {k: diffusers_names.text_key(k) for k in part}
        else:
            try:
                rules = (diffusers_names.unet_prefixes if component == "unet"
                         else diffusers_names.vae_prefixes)(list(part))
            except ValueError:                      # max() of no block indices
                raise MeddapError(f"{file}: has no down_blocks.* tensors; it is not the {component} "
                                  f"of a diffusers Stable Diffusion folder.") from None
            names = {k: diffusers_names.rename(k, rules) for k in part}
        for key, t in part.items():
            if names[key] is None:
                raise MeddapError(f"{file}: tensor {key} has no SD v1 counterpart; is this an SD v1 "
                                  f"diffusers folder?")
            new = prefix + names[key]
            if component == "vae" and ".mid.attn_1." in new and t.dim() == 2:
                t = t[:, :, None, None]             # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
            tensors[new] = t
            if key in part_pages:
                pages[new] = part_pages[key]
    return Checkpoint(folder, tensors, files, pages)


# ---- what is in the file -------------------------------------------------------------
def detect_family(tensors: dict[str, torch.Tensor], path) -> None:
    """Raise a MeddapError naming the family when the tensors are not an SD v1 model."""
    keys = list(tensors)
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        raise MeddapError(f"{path}: this is an SDXL checkpoint (it has conditioner.embedders / label_emb); "
                          f"meddap runs Stable Diffusion v1 (v1.1-v1.5, e.g. sd-v1-4.ckpt) only.")
    k_proj = tensors.get(PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or (k_proj is not None and k_proj.shape[1] == 1024):
        raise MeddapError(f"{path}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, "
                          f"1024-wide context); meddap runs Stable Diffusion v1 (e.g. sd-v1-4.ckpt) only.")
    if not any(k.startswith(PREFIXES["unet"]) for k in keys):
        hint = ("it looks like a LoRA adapter; load it with meddap.lora.load_lora"
                if any("lora" in k for k in keys) else
                "it looks like one diffusers component; pass the whole diffusers folder"
                if any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in keys) else
                f"its {len(keys)} tensors start {keys[:3]}")
        raise MeddapError(f"{path}: not a Stable Diffusion v1 checkpoint: no tensor is under "
                          f"{PREFIXES['unet']} ({hint}).")


@dataclass
class KeyReport:
    """How a file's tensor names and shapes compare with an SD v1 config."""
    path: Path
    missing: dict[str, list[str]]       # component -> expected keys absent from the file
    mismatched: list[str]               # "key: file [..] vs expected [..]"
    unexpected: list[str]
    optional: list[str]                 # known optional keys present (schedule, EMA scalars, position ids)
    ignored: list[str]                  # EMA weight copies (model_ema.*), accepted and not loaded

    def raise_for_errors(self) -> None:
        for component, keys in self.missing.items():
            if keys:
                raise MeddapError(f"{self.path}: the {component} is incomplete: {len(keys)} tensors are "
                                  f"missing, first {keys[:3]}.")
        if self.mismatched:
            comp = next(c for c, p in PREFIXES.items() if self.mismatched[0].startswith(p))
            raise MeddapError(f"{self.path}: the {comp} has tensors of the wrong shape "
                              f"({len(self.mismatched)}), first {self.mismatched[:3]}.")
        if self.unexpected:
            raise MeddapError(f"{self.path}: {len(self.unexpected)} unexpected tensors, first "
                              f"{self.unexpected[:3]}; an SD v1 file holds only the UNet, VAE, text "
                              f"encoder and the optional {sorted(OPTIONAL)[:3]}...")


def check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path) -> KeyReport:
    """Compare names and shapes with `expected` (full checkpoint name -> shape)."""
    missing = {c: [k for k in expected if k.startswith(p) and k not in tensors] for c, p in PREFIXES.items()}
    mismatched, unexpected, optional, ignored = [], [], [], []
    for key, t in tensors.items():
        if key in expected:
            if tuple(t.shape) != tuple(expected[key]):
                mismatched.append(f"{key}: file {list(t.shape)} vs expected {list(expected[key])}")
        elif key in OPTIONAL:
            optional.append(key)
        elif key.startswith(IGNORED_PREFIX):
            ignored.append(key)
        else:
            unexpected.append(key)
    return KeyReport(Path(path), missing, mismatched, unexpected, optional, ignored)


def compare_schedule(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Differences between the file's schedule buffers and meddap's SD v1 schedule (empty if none)."""
    from meddap.sampling.schedule import sd_checkpoint_buffers
    ours = sd_checkpoint_buffers()
    out = []
    for name in SCHEDULE_BUFFERS:
        if name not in tensors:
            continue
        theirs = tensors[name].to(torch.float64)
        if theirs.shape != ours[name].shape:
            out.append(f"{name}: shape {list(theirs.shape)} vs meddap's {list(ours[name].shape)}")
            continue
        err = ((theirs - ours[name]).abs() / ours[name].abs().clamp(min=1e-12)).max().item()
        if err > 1e-4:                              # fp32 storage of the same fp64 formula agrees to ~1e-7
            out.append(f"{name}: relative difference up to {err:.3g} from meddap's schedule")
    return out
