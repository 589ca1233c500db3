"""The one generation path: SD v1 (+ a LoRA) -> PNGs with provenance and a manifest, resumable.

`meddap sample`, `meddap expand` and `meddap run` all generate through this file:

    GenerationConfig                      the sampling settings, declared once (CLI flags, TOML keys)
    load_model(checkpoint, lora, ...)     SD v1 with its adapter; sd.source_sha256, sd.lora_sha256
    write_images(sd, cfg, jobs, out)      one PNG and one manifest line per job, resumable

Resume rule. The jobs are cut into fixed chunks of `cfg.batch_size` in job order,
chunk k = jobs[k·B : (k+1)·B]. A chunk is kept when each of its files exists,
hashes (SHA-256) to its manifest line and that line has this run's settings.
Otherwise the whole chunk is sampled again as one batch and only its missing or
bad files are written: float32 kernels may round a row differently in a batch
of another size, so each image sees the batch it had in an uninterrupted run and
comes out bitwise equal to what that run wrote: on the CPU with the same number
of threads; on CUDA only with cudnn.benchmark off (`write_images` pins it) and
torch.use_deterministic_algorithms(True), and not guaranteed even then (SDPA
kernels may use atomics; see meddap.device).
- A file whose line has other settings stops the run: it belongs to another run.
- A PNG without a line (the run was killed between the PNG's atomic rename and
  its line) is adopted when its own text chunks carry this run's settings.
- A line written before a setting was recorded is read with the value that
  setting had then (`VALUE_WHEN_ABSENT`): such lines never merged adapters, so
  an adapted folder started before `lora_merged` existed resumes with --no-merge.
Manifest lines are read from OUT/manifest.jsonl and the `torchrun` ranks'
OUT/manifest.rank{r}.jsonl; the last line of a file wins.

Writing. PNG encoding and hashing run on PNG_WRITERS threads while the next
chunk samples; a file's line is appended once its bytes are on disk (atomic
rename) and hashed, and lines are appended in job order, so the manifest and
the files are the same bytes as those of a one-thread writer. A run that stops
leaves at most one chunk's files without their lines (complete PNGs: the rename
is atomic); the next run adopts them by the rule above.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from meddap.device import DEVICE_HELP, check_device_name, check_dtype_name, pin_cudnn
from meddap.errors import MeddapError
from meddap.io import output_folder
from meddap.sampling.samplers import Sampler
from meddap.sampling.schedule import SD_NUM_TRAIN_TIMESTEPS
from meddap.settings import all_of, at_least, finite, in_range, multiple_of, setting

MANIFEST_NAME = "manifest.jsonl"
# Pixels per latent cell: SD v1's VAE downsamples three times (2^3).
LATENT_DOWNSAMPLING = 8
# Guidance scales s accepted everywhere: 0 is the unconditional model, 1 no
# guidance, the authors used 7.5; above 100 is a typo, not a setting.
GUIDANCE_RANGE = (0, 100)
# Threads that encode and hash PNGs beside the sampling (zlib and SHA-256 release the GIL).
PNG_WRITERS = 2
# Settings a manifest line carries since a later version, with the value every older
# line implicitly had: before `lora_merged` was recorded, adapters were never merged.
VALUE_WHEN_ABSENT = {"lora_merged": False}

_side = multiple_of(LATENT_DOWNSAMPLING, "SD's VAE maps 8 x 8 pixels to one latent cell")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How images are sampled. Defaults are the MEDDAP authors' generation settings
    (released Inference_percent_breast.py: diffusers' SD v1.4 pipeline, PNDM, 30 steps,
    guidance 7.5, 512 x 512); they ran fp16, we default to fp32 (bitwise reproducible
    on the CPU; on CUDA see the resume rule above)."""
    sampler: Sampler = setting(Sampler.PNDM, help="reverse-process sampler")
    steps: int = setting(30, check=in_range(1, SD_NUM_TRAIN_TIMESTEPS), help="sampling steps")
    guidance: float = setting(7.5, check=all_of(finite(), in_range(*GUIDANCE_RANGE)),
                              help="classifier-free guidance scale s (1: none, 0: unconditional)")
    eta: float = setting(0.0, check=all_of(finite(), at_least(0)),
                         help="DDIM's eta, ddim only (0: deterministic, 1: DDPM's variance)")
    height: int = setting(512, check=_side, help="image height in pixels, a multiple of 8")
    width: int = setting(512, check=_side, help="image width in pixels, a multiple of 8")
    negative: str = setting("", help="negative prompt (empty: SD's unconditional prompt)")
    batch_size: int = setting(1, check=at_least(1),
                              help="images per UNet call (also the chunk a resume redoes whole)")
    device: str | None = setting(None, check=check_device_name, help=DEVICE_HELP)
    dtype: str = setting("fp32", check=check_dtype_name, help="weights' dtype: fp32, fp16 or bf16")
    merge: bool = setting(True, help="merge the LoRA into the UNet's weights before sampling "
                                     "(W0 + ΔW, rounded to --dtype); --no-merge keeps it a separate branch")
    compile: bool = setting(False, help="CUDA only: torch.compile the UNet with CUDA graphs for the run's "
                                        "fixed shapes (not covered by the CPU tests)")

    def cross_checks(self, label) -> None:
        if self.eta != 0 and self.sampler is not Sampler.DDIM:
            raise MeddapError(f"{label('eta')} = {self.eta:g} applies to the ddim sampler only; "
                              f"{label('sampler')} = {self.sampler.value!r} takes no eta (leave it at 0).")
        if self.compile and self.device and not self.device.startswith("cuda"):
            raise MeddapError(f"{label('compile')} = true works on CUDA only; {label('device')} = "
                              f"{self.device!r} (leave {label('compile')} off there).")


@dataclass(frozen=True, kw_only=True)
class SampleConfig(GenerationConfig):
    """One `meddap sample` run: `n` images of one prompt, image k seeded image_seed(seed, k)."""
    checkpoint: str = setting(help="SD v1 .ckpt/.safetensors file or diffusers folder")
    prompt: str = setting(help="the text prompt")
    out: str = setting(help="output folder (created; re-run the same command to resume)")
    lora: str | None = setting(None, help="LoRA adapter file (meddap or diffusers format)")
    n: int = setting(1, check=at_least(1), help="number of images")
    seed: int = setting(0, check=at_least(0), help="base seed")
    quiet: bool = setting(False, help="no progress bar")


# ---------------------------------------------------------------- the model

def check_model_files(checkpoint: str, lora: str | None) -> None:
    """Fail before any work when the weight files are not there."""
    if not Path(checkpoint).exists():
        raise MeddapError(f"checkpoint {checkpoint} does not exist; give a SD v1 "
                          f".ckpt/.safetensors file or a diffusers folder.")
    if lora is not None and Path(lora).is_dir():
        raise MeddapError(f"LoRA file {lora} is a directory, not a file; give an adapter file "
                          f"(.safetensors, meddap or diffusers format).")
    if lora is not None and not Path(lora).is_file():
        raise MeddapError(f"LoRA file {lora} does not exist.")


def load_model(checkpoint: str, lora: str | None = None, device: str | None = None,
               dtype: str = "fp32"):
    """SD v1 from `checkpoint` with the adapter file `lora` (if any) loaded into its UNet
    (and its new-token rows, if it has any, into the text tower: meddap.lora.new_tokens),
    on the device of meddap.device's rule (None: this process's GPU, else the CPU), in
    `dtype` ("fp32" | "fp16" | "bf16"). sd.source_sha256 and sd.lora_sha256 name both files."""
    from meddap.device import resolve_device, resolve_dtype
    from meddap.lora import load_lora
    from meddap.lora.new_tokens import apply_new_tokens
    from meddap.models.stable_diffusion import load_stable_diffusion

    check_model_files(checkpoint, lora)
    where = resolve_device(device)
    sd = load_stable_diffusion(checkpoint, device=where, dtype=resolve_dtype(dtype, where))
    if lora is not None:
        info = load_lora(sd.unet, lora)
        if info["new_tokens"] is not None:
            apply_new_tokens(sd.text_encoder, *info["new_tokens"], source=lora)
        sd.lora_sha256 = info["sha256"]
    return sd


# ---------------------------------------------------------------- files and manifest lines

@dataclass(frozen=True)
class ImageJob:
    """One image to make: OUT/`file` from `prompt` and `seed`. `meta` is extra
    provenance (e.g. class, index) written into the PNG and its manifest line."""
    file: str
    prompt: str
    seed: int
    meta: dict = field(default_factory=dict)


def manifest_rows(out: Path, manifest: Path | None = None) -> dict[str, dict]:
    """The line on record of each file of `out`: the last one in OUT/manifest.jsonl,
    OUT/manifest.rank*.jsonl and `manifest`, read in that order."""
    from meddap.io import read_jsonl

    paths = [out / MANIFEST_NAME, *sorted(out.glob("manifest.rank*.jsonl"))]
    if manifest is not None and Path(manifest) not in paths:
        paths.append(Path(manifest))
    rows: dict[str, dict] = {}
    for path in paths:
        for row in read_jsonl(path):
            rows[row["file"]] = row
    return rows


def _kept_line(out: Path, file: str, row: dict | None, want: dict) -> dict | None:
    """The manifest line of OUT/file when the file can be kept, else None (make it again).
    row: its line on record, or None (then the PNG's own text chunks stand in for it)."""
    from meddap.io import sha256_file
    from meddap.sampling.text_to_image import read_png_metadata

    path = out / file
    if not path.is_file():
        return None
    if row is None:                                 # killed between the PNG and its line
        try:
            row = {"file": file, "sha256": sha256_file(path), **read_png_metadata(path)}
        except MeddapError:
            return None                             # not a PNG of ours: make it again
    elif sha256_file(path) != row.get("sha256"):
        return None                                 # torn or edited: make it again
    recorded = {key: row.get(key, VALUE_WHEN_ABSENT.get(key)) for key in want}
    diff = [key for key in want if recorded[key] != want[key]]
    if diff:
        key = diff[0]
        raise MeddapError(f"{path} was made with other settings ({key}: {recorded[key]!r}, "
                          f"this run: {want[key]!r}); use another --out folder or delete it.")
    return row


def write_image_file(out: Path, file: str, image, meta: dict) -> dict:
    """Write OUT/file (atomically) and return its manifest line, hashed from the bytes on disk."""
    from meddap.io import sha256_file
    from meddap.sampling.text_to_image import write_png

    write_png(out / file, image, meta)
    return {"file": file, "sha256": sha256_file(out / file), **meta}


def write_images(sd, cfg: GenerationConfig, jobs: Sequence[ImageJob], out: str | Path, *,
                 manifest: str | Path | None = None, chunk_filter: Callable[[int], bool] | None = None,
                 desc: str = "generate", quiet: bool = False,
                 extra_settings: dict | None = None) -> dict[str, dict]:
    """Make every job's PNG under `out` by the resume rule above; return the manifest line
    of each job of the chunks done here, by file, in job order.

    manifest: where new lines are appended (default OUT/manifest.jsonl).
    chunk_filter(k): whether this process does chunk k (`meddap expand` under torchrun:
    k % world == rank); None: every chunk. extra_settings: further run-wide values
    written into each PNG and line and required to match on resume, like cfg's.
    With cfg.merge (the default) the adapters of sd's UNet are merged into its weights
    first (`meddap.lora.merge_lora`; sd stays merged), and each line records lora_merged.
    The negative prompt is encoded once per call.
    """
    from meddap.io import append_jsonl
    from meddap.lora import lora_layers, merge_lora
    from meddap.progress import Progress
    from meddap.sampling.text_to_image import TextToImage

    pin_cudnn()                                     # the same convolution algorithms in every run
    out = output_folder(out)
    manifest = Path(manifest) if manifest is not None else out / MANIFEST_NAME
    extra = dict(extra_settings or {})
    if cfg.merge and lora_layers(sd.unet):
        merge_lora(sd.unet)                         # W0 <- W0 + ΔW: the adapters cost no step time
    t2i = TextToImage(sd, cfg)
    run = {**t2i.settings, **extra}                 # what every file of this run shares
    for job in jobs:
        clash = sorted(set(job.meta) & ({"prompt", "seed", "token_ids", "file", "sha256"} | set(run)))
        if clash:
            raise ValueError(f"ImageJob {job.file}: meta may not set {', '.join(clash)}; "
                             f"these are written by write_images.")
    on_record = manifest_rows(out, manifest)
    B = cfg.batch_size
    chunks = [jobs[s:s + B] for k, s in enumerate(range(0, len(jobs), B))
              if chunk_filter is None or chunk_filter(k)]
    bar = Progress(total=sum(len(c) for c in chunks), desc=desc, enabled=not quiet)
    rows: dict[str, dict] = {}
    previous = None                                 # (chunk, entries) of the chunk whose files are being written

    def finish(chunk: Sequence[ImageJob], entries: dict[str, tuple[dict | Future, str]]) -> None:
        """Wait for the chunk's files, then append its lines as a one-thread writer would:
        the adopted ones, then the new ones, each in job order."""
        lines = {file: line.result() if isinstance(line, Future) else line
                 for file, (line, _) in entries.items()}
        for kind in ("adopted", "new"):
            for job in chunk:
                if entries[job.file][1] == kind:
                    append_jsonl(manifest, lines[job.file])
        rows.update((job.file, lines[job.file]) for job in chunk)

    with ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="png") as writers:
        for chunk in chunks:
            entries = {}                            # file -> (line or the Future of it, kept | adopted | new)
            for job in chunk:
                want = {"prompt": job.prompt, "seed": job.seed, **run}
                line = _kept_line(out, job.file, on_record.get(job.file), want)
                if line is not None:                # a PNG without a line on record is adopted
                    entries[job.file] = (line, "kept" if job.file in on_record else "adopted")
            todo = [job for job in chunk if job.file not in entries]
            if todo:
                images = t2i([job.prompt for job in chunk], [job.seed for job in chunk])   # the whole chunk
                for job, result in zip(chunk, images):
                    if job.file not in entries:
                        meta = {**result.metadata, **extra, **job.meta}
                        entries[job.file] = (writers.submit(write_image_file, out, job.file, result.image, meta),
                                             "new")
            if previous is not None:
                finish(*previous)                   # written while this chunk sampled
            previous = (chunk, entries)
            bar.update(len(chunk), postfix=f"{len(todo)} new" if todo else "kept")
        if previous is not None:
            finish(*previous)
    bar.close()
    return rows
