"""Dataset expansion (MEDDAP section 3.3): synthetic training images per class,
adjective and ratio.

    OUT/{adjective | no_adjective}/ratio_{r}/train/{class}/syn_{i:05d}.png
    OUT/.../train/{class}/real_{name}        (--copy-real: the real images too)
    OUT/manifest.jsonl                       one line per file
    OUT/expand.json                          settings, inputs' hashes, counts

Class c with n_c real images gets int(n_c * r) synthetic images at ratio r
(released make_dataset_breast.py; paper: 50 %, 100 %, 200 %).

Image i of class c is the same picture at every ratio: its seed depends on
(base seed, class, i) only, so the images of a smaller ratio are the first
ones of the largest and are hard-linked (copied where links are impossible),
not sampled again. Adjectives share seeds too: "colorful" image i and "dark"
image i start from the same noise, a paired design whose only difference is
the prompt.

Work is cut into fixed batches of the canonical job order (adjective, class,
i); under `torchrun` (WORLD_SIZE > 1) batch k goes to rank k mod WORLD_SIZE,
so every image is sampled in the same batch as in a one-process run and the
union of the ranks' files equals it byte for byte.

Resume: each rank appends to its own OUT/manifest.rank{r}.jsonl; a re-run
keeps an image whose bytes hash to its manifest line and whose settings
match, and makes the rest again (a torn or edited file fails the hash). At
the end rank 0 merges the lines into OUT/manifest.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from meddap.data.prompts import ADJECTIVES, NO_ADJECTIVE, prompt_for, unknown_adjectives
from meddap.errors import MeddapError

MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "expand.json"
NO_ADJECTIVE_FOLDER = "no_adjective"
DTYPES = ("fp32", "fp16", "bf16")
BARRIER_TIMEOUT = timedelta(hours=48)      # ranks may finish far apart after a resume


@dataclass(frozen=True)
class ExpandConfig:
    """One `meddap expand` run. Defaults: paper's ratios and Table 1's adjectives;
    generation settings of the released code (PNDM, 30 steps, guidance 7.5,
    512 x 512; they ran fp16, we default to fp32 for reproducibility)."""
    checkpoint: str
    data: str
    out: str
    lora: str | None = None
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    adjectives: tuple[str, ...] = ADJECTIVES
    copy_real: bool = False
    as_released: bool = False
    negative: str = ""
    sampler: str = "pndm"
    steps: int = 30
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    batch_size: int = 1
    device: str | None = None
    dtype: str = "fp32"
    quiet: bool = False


def adjective_folder(adjective: str) -> str:
    """'none' -> no_adjective; others as written, spaces as underscores."""
    word = " ".join(adjective.split())
    return NO_ADJECTIVE_FOLDER if word.lower() == NO_ADJECTIVE else word.replace(" ", "_")


def ratio_folder(ratio: float) -> str:
    return f"ratio_{ratio:g}"


def _folder(adjective: str, ratio: float, label: str) -> str:
    """OUT-relative folder of one training set's class."""
    return f"{adjective_folder(adjective)}/{ratio_folder(ratio)}/train/{label}"


def class_seed(base_seed: int, class_name: str) -> int:
    """A base seed per class: image_seed(base_seed, first 4 bytes of SHA-256(class))."""
    from meddap.sampling.text_to_image import image_seed
    key = int.from_bytes(hashlib.sha256(class_name.encode("utf-8")).digest()[:4], "big")
    return image_seed(base_seed, key)


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise MeddapError(f"--ratios {text!r} is not a comma-separated list of numbers; "
                          f"e.g. 0.5,1,2.") from None
    return ratios


def parse_adjectives(text: str) -> tuple[str, ...]:
    return tuple(" ".join(a.split()) for a in text.split(",") if a.strip())


def check_config(cfg: ExpandConfig) -> None:
    """Reject bad settings before any weights load; warn about unknown adjectives."""
    from meddap.sampling.samplers import Sampler, check_num_steps
    from meddap.sampling.text_to_image import check_guidance, check_size
    if not cfg.ratios:
        raise MeddapError("--ratios is empty; give e.g. 0.5,1,2.")
    bad = [r for r in cfg.ratios if not r > 0 or r != r or r == float("inf")]
    if bad:
        raise MeddapError(f"--ratios {', '.join(f'{r:g}' for r in bad)}: every ratio must be a "
                          f"finite number above 0 (the paper: 0.5, 1, 2).")
    for what, values in (("--ratios", [ratio_folder(r) for r in cfg.ratios]),
                         ("--adjectives", [adjective_folder(a) for a in cfg.adjectives])):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise MeddapError(f"{what} lists {', '.join(dup)} more than once.")
    if not cfg.adjectives:
        raise MeddapError(f"--adjectives is empty; give e.g. none,{','.join(ADJECTIVES[1:3])}.")
    for a in cfg.adjectives:
        if "/" in a or a.startswith("."):
            raise MeddapError(f"adjective {a!r} cannot name a folder; avoid '/' and a leading '.'.")
    unknown = unknown_adjectives(list(cfg.adjectives))
    if unknown:
        warnings.warn(f"adjective(s) {', '.join(unknown)} are not among MEDDAP Table 1's "
                      f"({', '.join(ADJECTIVES)}); using them as written.", stacklevel=2)
    Sampler.parse(cfg.sampler)
    check_num_steps(cfg.steps)
    check_size(cfg.height, cfg.width)
    check_guidance(cfg.guidance)
    if cfg.dtype not in DTYPES:
        raise MeddapError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}.")
    if cfg.batch_size < 1:
        raise MeddapError(f"--batch-size {cfg.batch_size} must be at least 1.")
    if not Path(cfg.checkpoint).exists():
        raise MeddapError(f"checkpoint {cfg.checkpoint} does not exist; give a SD v1 "
                          f".ckpt/.safetensors file or a diffusers folder.")
    if cfg.lora is not None and not Path(cfg.lora).is_file():
        raise MeddapError(f"LoRA file {cfg.lora} does not exist.")


@dataclass(frozen=True)
class Job:
    adjective: str
    label: str
    index: int
    prompt: str
    seed: int
    files: tuple[tuple[float, str], ...]   # (ratio, path relative to OUT); files[0] is sampled,
                                           # the others are links to it (smaller ratios)


def plan(cfg: ExpandConfig, counts: dict[str, int]) -> list[Job]:
    """Every synthetic image in the canonical order (adjective, class, index)."""
    from meddap.sampling.text_to_image import image_seed
    jobs = []
    for adj in cfg.adjectives:
        for label, n_real in counts.items():
            per_ratio = {r: int(n_real * r) for r in sorted(cfg.ratios, reverse=True)}
            prompt = prompt_for(label, adj, as_released=cfg.as_released)
            base = class_seed(cfg.seed, label)
            for i in range(max(per_ratio.values())):
                files = tuple((r, f"{_folder(adj, r, label)}/syn_{i:05d}.png")
                              for r, n in per_ratio.items() if i < n)
                jobs.append(Job(adj, label, i, prompt, image_seed(base, i), files))
    return jobs


def _place(src: Path, dst: Path) -> None:
    """dst becomes the same bytes as src: a hard link, or a copy where links fail;
    written under a temporary name and renamed (atomic)."""
    from meddap.io import atomic_path
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; joins a gloo group when > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return rank, world


def _verified(out: Path, rows: dict[str, dict], file: str, expected: dict) -> bool:
    """True when OUT/file exists and hashes to its manifest line, and that line
    has this run's settings; a file made with other settings is an error."""
    from meddap.io import sha256_file
    row, path = rows.get(file), out / file
    if row is None or not path.is_file() or sha256_file(path) != row.get("sha256"):
        return False                       # missing, torn or edited: make it again
    diff = [k for k in expected if row.get(k) != expected[k]]
    if diff:
        raise MeddapError(f"{path} was made with other settings ({diff[0]}: {row.get(diff[0])!r}, "
                          f"this run: {expected[diff[0]]!r}); use another --out folder or delete it.")
    return True


def _read_manifests(out: Path) -> dict[str, dict]:
    """The last line per file of OUT/manifest.jsonl and every rank's shard."""
    from meddap.io import read_jsonl
    rows: dict[str, dict] = {}
    for path in [out / MANIFEST_NAME, *sorted(out.glob("manifest.rank*.jsonl"))]:
        for row in read_jsonl(path):
            rows[row["file"]] = row
    return rows


def _copy_real(cfg: ExpandConfig, out: Path, image_set, rows: dict[str, dict], shard: Path) -> None:
    """Link (or copy) every real image into every training folder: `real_{name}`."""
    from meddap.io import append_jsonl, sha256_file
    for item in image_set.items:
        sha = sha256_file(item.path)
        for adj in cfg.adjectives:
            for r in cfg.ratios:
                file = f"{_folder(adj, r, item.label)}/real_{item.path.name}"
                if _verified(out, rows, file, {"sha256": sha}):
                    continue
                _place(item.path, out / file)
                rows[file] = {"file": file, "sha256": sha, "source": "real",
                              "original": str(item.path), "class": item.label,
                              "adjective": adj, "ratio": r}
                append_jsonl(shard, rows[file])


def expand(cfg: ExpandConfig) -> dict:
    """Run `meddap expand` (this rank's share); rank 0 returns the summary."""
    check_config(cfg)
    import torch

    from meddap.data.datasets import resolve_images
    from meddap.io import append_jsonl, sha256_file, write_json_atomic, write_text_atomic
    from meddap.models.stable_diffusion import load_stable_diffusion
    from meddap.progress import Progress
    from meddap.sampling.samplers import Sampler
    from meddap.sampling.text_to_image import generate, write_png

    # 1. Data: the real training images and their class counts.
    image_set = resolve_images(cfg.data)
    if not image_set.items:
        raise MeddapError(f"--data {cfg.data} holds no images; expansion sizes are ratios of it.")
    counts = {c: n for c, n in image_set.counts().items() if n > 0}
    # 2. Model on this rank's device.
    rank, world = _distributed()
    device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
                            if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    sd = load_stable_diffusion(cfg.checkpoint, device=device, dtype=dtype)
    if cfg.lora is not None:
        from meddap.lora import load_lora
        load_lora(sd.unet, cfg.lora)
        sd.lora_sha256 = sha256_file(cfg.lora)
    settings = {"negative_prompt": cfg.negative, "sampler": Sampler.parse(cfg.sampler).value,
                "steps": cfg.steps, "guidance": float(cfg.guidance), "height": cfg.height,
                "width": cfg.width, "checkpoint_sha256": sd.source_sha256,
                "lora_sha256": getattr(sd, "lora_sha256", None)}
    # 3. This rank's batches of the canonical plan; keep what a run before finished.
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shard = out / f"manifest.rank{rank}.jsonl"
    rows = _read_manifests(out)
    if rank == 0 and cfg.copy_real:
        _copy_real(cfg, out, image_set, rows, shard)
    jobs = plan(cfg, counts)
    batches = [jobs[s:s + cfg.batch_size] for s in range(0, len(jobs), cfg.batch_size)]
    mine = [b for k, b in enumerate(batches) if k % world == rank]
    n_mine = sum(len(b) for b in mine)
    bar = Progress(total=n_mine, desc=f"expand (rank {rank}/{world})" if world > 1 else "expand",
                   enabled=not cfg.quiet)
    for batch in mine:
        expected = [{**settings, "prompt": j.prompt, "seed": j.seed} for j in batch]
        missing = [k for k, j in enumerate(batch)
                   if not _verified(out, rows, j.files[0][1], expected[k])]
        if missing:
            # The whole batch is sampled again so that each image sees the batch it
            # had in an uninterrupted run (float rounding may depend on it).
            results = generate(sd, [j.prompt for j in batch], [j.seed for j in batch],
                               negative_prompt=cfg.negative, sampler=cfg.sampler, steps=cfg.steps,
                               guidance=cfg.guidance, height=cfg.height, width=cfg.width,
                               batch_size=len(batch), show_progress=False)
            for k in missing:
                j, result = batch[k], results[k]
                ratio, file = j.files[0]
                meta = {**result.metadata, "adjective": j.adjective, "class": j.label,
                        "index": j.index, "base_seed": cfg.seed, "as_released": cfg.as_released}
                write_png(out / file, result.image, meta)
                rows[file] = {"file": file, "sha256": sha256_file(out / file), "source": "synthetic",
                              "ratio": ratio, **{key: meta[key] for key in (
                                  "prompt", "seed", "adjective", "class", "index", "as_released",
                                  *settings)}}
                append_jsonl(shard, rows[file])
        for k, j in enumerate(batch):
            primary = rows[j.files[0][1]]
            for ratio, file in j.files[1:]:
                if not _verified(out, rows, file, expected[k]) or \
                        rows[file]["sha256"] != primary["sha256"]:
                    _place(out / j.files[0][1], out / file)
                    rows[file] = {**primary, "file": file, "ratio": ratio}
                    append_jsonl(shard, rows[file])
        bar.update(len(batch), postfix=f"{len(missing)} new" if missing else "kept")
    bar.close()
    # 4. Rank 0 merges every rank's lines into one manifest (files that verify).
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    summary = {}
    if rank == 0:
        merged = _read_manifests(out)
        planned = {f for j in jobs for _, f in j.files}
        if cfg.copy_real:
            planned |= {f"{_folder(a, r, it.label)}/real_{it.path.name}"
                        for it in image_set.items for a in cfg.adjectives for r in cfg.ratios}
        lines = [merged[f] for f in sorted(planned) if f in merged
                 and sha256_file(out / f) == merged[f]["sha256"]]
        if len(lines) != len(planned):
            raise MeddapError(f"{len(planned) - len(lines)} planned files of {out} are missing or "
                              f"do not match the manifest after the run; re-run to make them.")
        write_text_atomic(out / MANIFEST_NAME,
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
        for stale in out.glob("manifest.rank*.jsonl"):
            stale.unlink()
        summary = {
            "settings": {**asdict(cfg), "world_size": world}, **settings,
            "data_counts": counts, "n_files": len(lines),
            "synthetic_counts": {adjective_folder(a): {ratio_folder(r): {c: int(n * r)
                                 for c, n in counts.items()} for r in cfg.ratios}
                                 for a in cfg.adjectives},
        }
        write_json_atomic(out / SUMMARY_NAME, summary)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return summary


def expand_from_args(args) -> int:
    cfg = ExpandConfig(
        checkpoint=args.checkpoint, data=args.data, out=args.out, lora=args.lora,
        ratios=parse_ratios(args.ratios), adjectives=parse_adjectives(args.adjectives),
        copy_real=args.copy_real, as_released=args.as_released, negative=args.negative,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, seed=args.seed, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, quiet=args.quiet)
    summary = expand(cfg)
    if summary and not cfg.quiet:
        print(f"meddap expand: {summary['n_files']} files in {cfg.out}; manifest "
              f"{Path(cfg.out) / MANIFEST_NAME}", file=sys.stderr)
    return 0
