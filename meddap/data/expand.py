"""Dataset expansion (MEDDAP section 3.3): synthetic training images per class,
adjective and ratio.

    OUT/{adjective | no_adjective}/ratio_{r}/train/{class}/syn_{i:05d}.png
    OUT/.../train/{class}/real_{name}        (--copy-real: copies of the real images)
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

The sampled images are written by the one generation path,
`meddap.sampling.generation.write_images`, and resume by its rule: fixed
chunks of --batch-size in the canonical job order (adjective, class, i); a
chunk whose files all hash to their manifest lines, made with these settings,
is kept, any other is sampled again whole. Under `torchrun` (WORLD_SIZE > 1)
chunk k goes to rank k mod WORLD_SIZE, so every image is sampled in the same
batch as in a one-process run and the union of the ranks' files equals it
byte for byte.

Each rank appends to its own OUT/manifest.rank{r}.jsonl; at the end rank 0
merges the lines into OUT/manifest.jsonl. The links of smaller ratios and the
--copy-real images are checked by their hashes too and made again when wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from meddap.data.prompts import ADJECTIVES, NO_ADJECTIVE, prompt_for, unknown_adjectives
from meddap.errors import MeddapError
from meddap.io import output_folder
from meddap.sampling.generation import MANIFEST_NAME, GenerationConfig
from meddap.settings import above, as_dict, at_least, nonempty_each, setting, validate

SUMMARY_NAME = "expand.json"
NO_ADJECTIVE_FOLDER = "no_adjective"


def parse_ratios(value) -> tuple[float, ...]:
    """"0.5,1,2" (the command line) or [0.5, 1, 2] (a config file) -> (0.5, 1.0, 2.0)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(items, (list, tuple)) or any(isinstance(r, bool) for r in items):
            raise ValueError
        return tuple(float(r) for r in items if str(r).strip())
    except ValueError:
        raise MeddapError(f"ratios {value!r} is not a comma-separated list of numbers; "
                          f"e.g. 0.5,1,2.") from None


def parse_adjectives(value) -> tuple[str, ...]:
    """"none,dark" or ["none", "dark"] -> ("none", "dark"), whitespace collapsed."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(a, str) for a in items):
        raise MeddapError(f"adjectives {value!r} is not a comma-separated list of words; "
                          f"e.g. none,colorful,dark.")
    return tuple(" ".join(a.split()) for a in items if a.strip())


def _twice(names: list[str]) -> str | None:
    dup = sorted({n for n in names if names.count(n) > 1})
    return f"lists {', '.join(dup)} more than once" if dup else None


def _check_ratios(ratios: tuple[float, ...]) -> str | None:
    return (nonempty_each(above(0), "0.5,1,2: every ratio > 0 (the paper's +50%, +100%, +200%)")(ratios)
            or _twice([ratio_folder(r) for r in ratios]))


def _folder_word(adjective: str) -> str | None:
    """An adjective names a folder of OUT: not empty, no '/', no leading '.' (so not '..')."""
    if not adjective.strip() or "/" in adjective or adjective.startswith("."):
        return "cannot name a folder (give a word without '/' and without a leading '.')"
    return None


def _check_adjectives(adjectives: tuple[str, ...]) -> str | None:
    return (nonempty_each(_folder_word, f"none,{','.join(ADJECTIVES[1:3])}")(adjectives)
            or _twice([adjective_folder(a) for a in adjectives]))


@dataclass(frozen=True, kw_only=True)
class ExpandConfig(GenerationConfig):
    """One `meddap expand` run. Defaults: the paper's ratios (50, 100, 200 per cent)
    and Table 1's adjectives; the generation settings are GenerationConfig's (the
    authors')."""
    checkpoint: str = setting(help="SD v1 .ckpt/.safetensors file or diffusers folder")
    data: str = setting(help="real training images: folder or SPLIT.json:FOLD:train")
    out: str = setting(help="output folder (created; re-run the same command to resume)")
    lora: str | None = setting(None, help="USLoRA adapter file (meddap or diffusers format)")
    ratios: tuple[float, ...] = setting((0.5, 1.0, 2.0), parse=parse_ratios, check=_check_ratios,
                                        help="synthetic/real images per class, comma-separated")
    adjectives: tuple[str, ...] = setting(ADJECTIVES, parse=parse_adjectives, check=_check_adjectives,
                                          help="comma-separated, MEDDAP Table 1's ten by default; "
                                               "none: the plain prompt")
    copy_real: bool = setting(False, help="also put the real images in each training folder "
                                          "(the released code's copy flag)")
    as_released: bool = setting(False, help="bug reproduction: the released code's glued prompts "
                                            "('colorfulan ultrasound photo of ...'); default: the "
                                            "paper's prompt")
    seed: int = setting(0, check=at_least(0), help="base seed")
    quiet: bool = setting(False, help="no progress bar")


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


def _same_bytes(out: Path, rows: dict[str, dict], file: str, sha256: str) -> bool:
    """True when OUT/file exists, its line on record says `sha256` and its bytes hash to it."""
    from meddap.io import sha256_file
    row, path = rows.get(file), out / file
    return row is not None and row.get("sha256") == sha256 and path.is_file() \
        and sha256_file(path) == sha256


def _copy(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (bytes, permission bits and times: shutil.copy2), written
    under a temporary name and renamed (atomic). Never a link: editing the copy must not
    edit the user's original."""
    from meddap.io import atomic_path
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def _copy_real(cfg: ExpandConfig, out: Path, image_set, rows: dict[str, dict], shard: Path) -> None:
    """Copy every real image into every training folder: `real_{name}`. A file that is the
    original itself (a hard link made by an older meddap) is copied anew."""
    from meddap.io import append_jsonl, sha256_file
    for item in image_set.items:
        sha = sha256_file(item.path)
        for adj in cfg.adjectives:
            for r in cfg.ratios:
                file = f"{_folder(adj, r, item.label)}/real_{item.path.name}"
                if _same_bytes(out, rows, file, sha) and not os.path.samefile(item.path, out / file):
                    continue
                _copy(item.path, out / file)
                rows[file] = {"file": file, "sha256": sha, "source": "real",
                              "original": str(item.path), "class": item.label,
                              "adjective": adj, "ratio": r}
                append_jsonl(shard, rows[file])


def expand(cfg: ExpandConfig, ranks=None) -> dict:
    """Run `meddap expand` (this rank's share of the chunks); rank 0 returns the summary.

    `ranks`: the job's processes (meddap.distributed); by default torchrun's from the
    environment, or one process. The caller holds the process group (the command
    joins it around this call). Under --shard, a rank-0 shard that finds another
    shard's chunks missing returns {} (not finished) instead of failing."""
    from meddap.data.datasets import resolve_images
    from meddap.io import append_jsonl, sha256_file, write_json_atomic, write_text_atomic
    from meddap.sampling.generation import (ImageJob, check_model_files, load_model, manifest_rows,
                                            write_images)

    validate(cfg)
    unknown = unknown_adjectives(list(cfg.adjectives))
    if unknown:
        warnings.warn(f"adjective(s) {', '.join(unknown)} are not among MEDDAP Table 1's "
                      f"({', '.join(ADJECTIVES)}); using them as written.", stacklevel=2)
    check_model_files(cfg.checkpoint, cfg.lora)       # before any weights load
    # 1. Data: the real training images and their class counts.
    image_set = resolve_images(cfg.data)
    if not image_set.items:
        raise MeddapError(f"--data {cfg.data} holds no images; expansion sizes are ratios of it.")
    counts = {c: n for c, n in image_set.counts().items() if n > 0}
    # 2. Model on this rank's device (meddap.device: cuda:LOCAL_RANK under torchrun).
    from meddap.distributed import Mode, Ranks
    ranks = ranks or Ranks.from_environment()
    rank, world = ranks.rank, ranks.world
    sd = load_model(cfg.checkpoint, cfg.lora, cfg.device, cfg.dtype)
    # 3. The real images (rank 0), then this rank's chunks of the canonical plan.
    out = output_folder(cfg.out)
    shard = out / f"manifest.rank{rank}.jsonl"
    if rank == 0 and cfg.copy_real:
        _copy_real(cfg, out, image_set, manifest_rows(out), shard)
    jobs = plan(cfg, counts)
    made = write_images(
        sd, cfg, [ImageJob(file=j.files[0][1], prompt=j.prompt, seed=j.seed,
                           meta={"source": "synthetic", "adjective": j.adjective, "class": j.label,
                                 "index": j.index, "base_seed": cfg.seed, "as_released": cfg.as_released})
                  for j in jobs],
        out, manifest=shard, chunk_filter=lambda k: k % world == rank,
        desc=f"expand (rank {rank}/{world})" if world > 1 else "expand", quiet=cfg.quiet)
    # 4. Smaller ratios: links to the images this rank kept or made.
    rows = manifest_rows(out)
    for j in jobs:
        primary = made.get(j.files[0][1])
        if primary is None:
            continue                                  # another rank's image
        for _, file in j.files[1:]:
            if not _same_bytes(out, rows, file, primary["sha256"]):
                _place(out / primary["file"], out / file)
                rows[file] = {**primary, "file": file}
                append_jsonl(shard, rows[file])
    # 5. Rank 0 merges every rank's lines into one manifest (files that verify).
    ranks.barrier("expand")
    summary = {}
    if rank == 0:
        merged = manifest_rows(out)
        planned = {f for j in jobs for _, f in j.files}
        if cfg.copy_real:
            planned |= {f"{_folder(a, r, it.label)}/real_{it.path.name}"
                        for it in image_set.items for a in cfg.adjectives for r in cfg.ratios}
        lines = [merged[f] for f in sorted(planned) if f in merged
                 and sha256_file(out / f) == merged[f]["sha256"]]
        if len(lines) != len(planned) and ranks.mode is Mode.SHARD:
            return {}                                  # other shards' chunks are still to come
        if len(lines) != len(planned):
            raise MeddapError(f"{len(planned) - len(lines)} planned files of {out} are missing or "
                              f"do not match the manifest after the run; re-run to make them.")
        write_text_atomic(out / MANIFEST_NAME,
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
        for stale in out.glob("manifest.rank*.jsonl"):
            stale.unlink()
        summary = {
            "settings": {**as_dict(cfg), "world_size": world},
            "checkpoint_sha256": sd.source_sha256, "lora_sha256": sd.lora_sha256,
            "data_counts": counts, "n_files": len(lines),
            "synthetic_counts": {adjective_folder(a): {ratio_folder(r): {c: int(n * r)
                                 for c, n in counts.items()} for r in cfg.ratios}
                                 for a in cfg.adjectives},
        }
        write_json_atomic(out / SUMMARY_NAME, summary)
    ranks.barrier("expand merge")
    return summary
