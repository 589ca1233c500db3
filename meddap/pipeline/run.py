"""`meddap run CONFIG`: the paper's protocol (MEDDAP Fig. 1) as resumable stages.

1. data      real images (a BUSI-layout folder, or the phantom written to OUT/data/real)
             and an optional unseen set (OUT/data/unseen: phantom site b);
2. split     leakage-safe folds (OUT/split/split.json);
   per fold k (OUT/fold{k}/):
3. lora      USLoRA on the fold's training images only (meddap.lora.train, as `meddap train-lora`);
4. expand    per adjective: int(count x ratio) images per class and ratio, from the adapted
             base (OUT/fold{k}/synthetic/{adjective}/ratio_{r}/train/{class}; `meddap expand`);
5. check     (generate.check_images > 0, fold 0) the same prompts and seeds with and
             without the adapters: OUT/synthetic/{class}, OUT/synthetic_base/{class}; and
             the reference: fold 0's real test images through the base's autoencoder
             (OUT/reconstructed/{class}), what the decoder can draw of a real image;
6. fid       FID/KID and precision/recall/density/coverage of each synthetic set vs the fold's
             real training images, or the pixel substitute, NOT FID, when the FID Inception
             weights are absent (`meddap fid`); memorisation: each synthetic image's nearest
             training image against the test images' (`meddap memorization`);
7. classify  per network: real-only and real+synthetic per (adjective, ratio); scored on
             the fold's test part and the unseen set (`meddap classify train`, result cells);
             the real-only network also scores the check sets (paper Fig. 1a);
8. gradcam   overlays of the real-only and the best real+synthetic network;
then tables (meddap.classify.tables) and OUT/report.md (meddap.pipeline.report).

Each stage calls the function its command calls, with the config its TOML
section filled (pipeline/config.py), takes the run's `Context` and returns a
named result. Each writes stage.json with the hashes of its inputs (stages.py).

Many processes (torchrun, or `--shard i/N`; meddap.distributed): the stages
run in the order above, each over all folds; within a stage the units go to
ranks by one static rule, unit k to rank k mod N, where the units are
    data, split        one unit each
    lora               one fold per unit
    expand, check      the fixed image chunks of the one generation path (chunk k)
    fid                one (fold, set) per unit; memorization one (fold, adjective) per unit
    classify           one (fold, network, condition) cell per unit
    gradcam            one fold per unit
Each unit writes only its own files, atomically, in the layout of a
one-process run, so the results are the same bytes whoever makes them; rank
0 alone empties stale stage folders, finishes stages (stage.json, merged
manifests, fid.json, summary.json) and writes the tables and report.md after
the last barrier. A shard does the stages that are ready and stops at the
first one that waits for another shard; a last run without --shard does
what is left and assembles the tables.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from meddap.distributed import Ranks
from meddap.errors import MeddapError
from meddap.io import sha256_file, write_json_atomic
from meddap.pipeline.config import DataSource, RunConfig, resolve_path, stage_config
from meddap.pipeline.stages import Stage, json_sha256, tree_sha256


_RANKS = Ranks()


def _log(msg: str) -> None:
    where = f" [rank {_RANKS.rank}/{_RANKS.world}]" if _RANKS.world > 1 else ""
    print(f"meddap run{where}: {msg}", flush=True)


def _label(section: str):
    """Names of a section's settings in errors raised inside a stage; the device is [run]'s."""
    return lambda name: "[run] device" if name == "device" else f"[{section}] {name}"


@dataclass(frozen=True)
class Context:
    """What every stage of one run needs: the config, the output folder and the base model file."""
    cfg: RunConfig
    out: Path
    checkpoint: Path           # [lora] checkpoint, resolved
    base_sha256: str
    ranks: Ranks = field(default_factory=Ranks)


@dataclass(frozen=True)
class Data:
    real: str                  # class folders of the real images
    real_sha256: str
    unseen: str                # "" = no unseen set
    unseen_sha256: str


@dataclass(frozen=True)
class Split:
    path: str                  # split.json
    sha256: str


@dataclass(frozen=True)
class Adapter:
    path: Path                 # lora.safetensors of one fold
    sha256: str


@dataclass(frozen=True)
class Synthetic:
    folders: dict              # adjective -> ratio -> OUT-absolute training folder of the synthetic images
    sha256: str


@dataclass(frozen=True)
class Check:
    folders: dict              # "adapted" | "base" | "reconstructed" -> folder of class folders
    sha256: str


# ---------------------------------------------------------------- 0. before any work

def preflight(cfg: RunConfig, checkpoint: Path) -> None:
    """Every file the run will read, opened with the safe loaders, and the split sizes checked
    against the data, before any stage starts: a bad input costs seconds, not hours.

    The SD file is parsed and its keys checked (header and mapping only for .safetensors);
    the FID Inception file (when it will be used) and any torchvision ImageNet file in
    weights/ are read and their hashes checked."""
    from meddap.classify.networks import read_imagenet_state
    from meddap.data.datasets import scan_folder
    from meddap.fid import FeatureSpace, resolve_feature_space
    from meddap.fid.inception import FID_WEIGHTS_SHA256, FID_WEIGHTS_URL, read_weights
    from meddap.models.stable_diffusion import inspect_checkpoint

    d = cfg.data
    if d.source is DataSource.FOLDER:
        real = resolve_path(d.path)
        if not real.is_dir():
            raise MeddapError(f"[data] path = {d.path!r}: folder {real} does not exist; put the BUSI class "
                              f"folders (benign/, malignant/, normal/) there or change [data] path.")
        n = sum(scan_folder(real).counts().values())
    else:
        n = sum(d.phantom_counts.values())
    if d.val + d.test >= n:
        raise MeddapError(f"[data] val = {d.val} and [data] test = {d.test} leave no training images of the "
                          f"{n} real images; choose val + test < {n} (the paper: 115 + 120 of 780).")
    try:
        _, _, keys = inspect_checkpoint(checkpoint)
        keys.raise_for_errors()
    except MeddapError as e:
        raise MeddapError(f"[lora] checkpoint = {cfg.lora.checkpoint!r}: {e}") from None
    fid = replace(cfg.fid, inception_weights=str(resolve_path(cfg.fid.inception_weights)))
    if resolve_feature_space(fid, _label("fid")) is FeatureSpace.INCEPTION:
        read_weights(Path(fid.inception_weights), what="FID Inception (TF-2015 graph, pytorch-fid port)",
                     origin=FID_WEIGHTS_URL, sha256=FID_WEIGHTS_SHA256)
    for arch in cfg.classify.networks:
        path = resolve_path("weights") / arch.spec.imagenet_file
        if path.is_file():
            read_imagenet_state(arch, path)


# ---------------------------------------------------------------- 1-2. data and split

class NotReady(Exception):
    """A shard reached a stage that waits for another shard's units."""


def stage_data(ctx: Context) -> Data | None:
    """The real (and unseen) image folders and their content hashes (rank 0 writes the phantom)."""
    from meddap.data.phantom import Site, write_phantom

    cfg, out, d = ctx.cfg, ctx.out, ctx.cfg.data
    if d.source is DataSource.FOLDER:
        real = resolve_path(d.path)
        unseen = resolve_path(d.unseen) if d.unseen else None
        if unseen is not None and not unseen.is_dir():
            raise MeddapError(f"[data] unseen = {d.unseen!r}: folder {unseen} does not exist; "
                              f"give the Dataset B folder (benign/, malignant/) or \"\" for none.")
        return Data(real=str(real), real_sha256=tree_sha256(real), unseen=str(unseen) if unseen else "",
                    unseen_sha256=tree_sha256(unseen) if unseen else "")
    st = Stage(out / "data", "data", {"data": cfg.section_dict("data"), "seed": cfg.run.seed}, _log,
               prepare=ctx.ranks.is_main)
    if not st.done():
        if not ctx.ranks.is_main:
            return None
        write_phantom(out / "data" / "real", seed=cfg.run.seed, site=Site.A, size=d.phantom_size,
                      counts=d.phantom_counts, show_progress=False)
        if d.unseen_phantom_counts:
            write_phantom(out / "data" / "unseen", seed=cfg.run.seed, site=Site.B, size=d.phantom_size,
                          counts=d.unseen_phantom_counts, show_progress=False)
        st.finish()
    unseen = out / "data" / "unseen"
    return Data(real=str(out / "data" / "real"), real_sha256=st.outputs_sha256,
                unseen=str(unseen) if unseen.is_dir() else "", unseen_sha256=st.outputs_sha256)


def stage_split(ctx: Context, data: Data) -> Split | None:
    """`meddap split` with [data]'s split settings (its seed is [run] seed); rank 0 writes it."""
    from meddap.data.splits import SplitConfig, write_split

    split_cfg = stage_config(SplitConfig, ctx.cfg.data)
    st = Stage(ctx.out / "split", "split", {"real_sha256": data.real_sha256,
                                            **{k: v for k, v in asdict(split_cfg).items()}}, _log,
               prepare=ctx.ranks.is_main)
    path = ctx.out / "split" / "split.json"
    if not st.done():
        if not ctx.ranks.is_main:
            return None
        write_split(data.real, path, split_cfg, show_progress=False)
        st.finish()
    return Split(path=str(path), sha256=sha256_file(path))


# ---------------------------------------------------------------- 3. USLoRA

def stage_lora(ctx: Context, split: Split, fold: int, work: bool) -> Adapter | None:
    """`meddap train-lora` with [lora] on the fold's training part (done by the fold's rank)."""
    from meddap.lora.train import train_lora

    folder = ctx.out / f"fold{fold}" / "lora"
    run_cfg = replace(ctx.cfg.lora, checkpoint=str(ctx.checkpoint), data=f"{split.path}:{fold}:train",
                      out=str(folder))
    st = Stage(folder, f"fold{fold}/lora", {"lora": ctx.cfg.section_dict("lora"), "base_sha256": ctx.base_sha256,
                                            "split_sha256": split.sha256, "fold": fold}, _log, prepare=work)
    if not st.done():
        if not work:
            return None
        train_lora(run_cfg, _label("lora"))
        st.finish()
    path = folder / "lora.safetensors"
    return Adapter(path=path, sha256=sha256_file(path))


# ---------------------------------------------------------------- 4-5. generation

def stage_expand(ctx: Context, split: Split, fold: int, lora: Adapter, work: bool) -> Synthetic | None:
    """`meddap expand` (meddap.data.expand) on the fold's training images, into
    OUT/fold{k}/synthetic/{adjective|no_adjective}/ratio_{r}/train/{class}/: int(count x ratio)
    images per class; image i of a class is the same picture at every ratio. The base seed of
    fold k is image_seed([run] seed, k). Every rank samples its chunks; rank 0 finishes."""
    from meddap.data.datasets import resolve_images
    from meddap.data.expand import ExpandConfig, adjective_folder, expand, ratio_folder
    from meddap.sampling.text_to_image import image_seed

    g = ctx.cfg.generate
    out = ctx.out / f"fold{fold}" / "synthetic"
    data = f"{split.path}:{fold}:train"
    counts = resolve_images(data).counts()
    inputs = {"generate": ctx.cfg.section_dict("generate"), "lora_sha256": lora.sha256, "counts": counts}
    st = Stage(out, f"fold{fold}/expand", inputs, _log, prepare=False)
    if work:                          # rank 0 empties a stale folder before any rank samples into it
        if ctx.ranks.is_main:
            Stage(out, f"fold{fold}/expand", inputs, _log).done()
        ctx.ranks.barrier(f"expand fold {fold}")
    if not st.done():
        if not work:
            return None
        _log(f"fold {fold}: expanding with {len(g.adjectives)} adjective(s) x ratios {list(g.ratios)}")
        summary = expand(stage_config(ExpandConfig, g, checkpoint=str(ctx.checkpoint), data=data, out=str(out),
                                      lora=str(lora.path), seed=image_seed(ctx.cfg.run.seed, fold)), ctx.ranks)
        if not summary:                 # not rank 0, or a shard whose siblings have not sampled theirs yet
            return None
        st.finish()
    folders = {adj: {r: str(out / adjective_folder(adj) / ratio_folder(r) / "train") for r in g.ratios}
               for adj in g.adjectives}
    return Synthetic(folders=folders, sha256=st.outputs_sha256)


def stage_check(ctx: Context, classes: list[str], split: Split, lora: Adapter, work: bool) -> Check | None:
    """The adaptation check of the demo: the same prompts and seeds through the adapted
    base (OUT/synthetic/{class}) and the base alone (OUT/synthetic_base/{class}), written
    by the one generation path of `meddap sample`, chunk k by rank k mod N; one model is
    held at a time. Rank 0 merges the ranks' manifest lines, writes the reference set
    (OUT/reconstructed/{class}, `write_reconstructions`) and finishes."""
    from meddap.data.datasets import resolve_images
    from meddap.data.prompts import prompt_for
    from meddap.io import read_jsonl, write_text_atomic
    from meddap.sampling.generation import GenerationConfig, ImageJob, load_model, write_images
    from meddap.sampling.text_to_image import image_seed

    g, ranks = ctx.cfg.generate, ctx.ranks
    gen = stage_config(GenerationConfig, g)
    generated = {"adapted": ctx.out / "synthetic", "base": ctx.out / "synthetic_base"}
    folders = {**generated, "reconstructed": ctx.out / "reconstructed"}
    inputs = {"generate": ctx.cfg.section_dict("generate"), "lora_sha256": lora.sha256, "classes": classes,
              "split_sha256": split.sha256}
    st = Stage(ctx.out / "check", "check", inputs, _log, owns=tuple(folders.values()), prepare=False)
    if work:                          # rank 0 empties stale folders before any rank samples into them
        if ranks.is_main:
            Stage(ctx.out / "check", "check", inputs, _log, owns=tuple(folders.values())).done()
        ranks.barrier("check prepare")
    if not st.done():
        if not work:
            return None
        jobs = [ImageJob(file=f"{cls}/{cls}_{i:04d}.png", prompt=prompt_for(cls, as_released=g.as_released),
                         seed=image_seed(ctx.cfg.run.seed * 7 + c, i), meta={"class": cls, "index": i})
                for c, cls in enumerate(classes) for i in range(g.check_images)]
        for kind, folder in generated.items():
            _log(f"check: {len(jobs)} images from the {kind} model")
            sd = load_model(str(ctx.checkpoint), str(lora.path) if kind == "adapted" else None,
                            device=gen.device, dtype=gen.dtype)
            write_images(sd, gen, jobs, folder, manifest=folder / f"manifest.rank{ranks.rank}.jsonl",
                         chunk_filter=ranks.owns, quiet=g.quiet)
            del sd
        ranks.barrier("check")
        if not ranks.is_main:
            return None
        for folder in generated.values():
            rows = {r["file"]: r for p in sorted(folder.glob("manifest.rank*.jsonl")) for r in read_jsonl(p)}
            if any(j.file not in rows for j in jobs):
                return None                 # a shard's chunks are still missing
            write_text_atomic(folder / "manifest.jsonl",
                              "".join(json.dumps(rows[j.file], sort_keys=True) + "\n" for j in jobs))
            for p in folder.glob("manifest.rank*.jsonl"):
                p.unlink()
        test = resolve_images(f"{split.path}:0:test")
        _log(f"check: {len(test.items)} real test images through the base's autoencoder")
        sd = load_model(str(ctx.checkpoint), device=gen.device, dtype=gen.dtype)
        write_reconstructions(sd, test, folders["reconstructed"], g.height, g.width, quiet=g.quiet)
        del sd
        st.finish({"sha256": {k: tree_sha256(f) for k, f in folders.items()}})
    return Check(folders={k: str(f) for k, f in folders.items()}, sha256=json_sha256(st.record["sha256"]))


def write_reconstructions(sd, images, out: Path, height: int, width: int, quiet: bool = False) -> None:
    """The check's reference set: each image x of `images` (an ImageSet), resized (bilinear) to
    cover height x width and center-cropped, as D(mean of q(z | x)), in OUT/{class}/{stem}.png
    with its source's name and SHA-256 (PNG text and OUT/manifest.jsonl).

    Every sample of the base is a decoded latent, so it shows no more of an image than the
    decoder can draw: the real-only network's accuracy on this set is the reference for the
    check's adapted images. It is not a strict bound: guidance can make a sample more typical
    of its class than a real image. Decoded one image at a time, in order, so the bytes do not
    depend on the number of images."""
    import torch
    import torchvision.transforms.functional as TF

    from meddap.data.datasets import load_rgb
    from meddap.io import write_text_atomic
    from meddap.progress import progress
    from meddap.sampling.generation import write_image_file
    from meddap.sampling.text_to_image import latents_to_images

    lines = []
    for item in progress(images.items, desc="reconstruct", enabled=not quiet):
        img = TF.center_crop(TF.resize(load_rgb(item.path), max(height, width),
                                       interpolation=TF.InterpolationMode.BILINEAR), [height, width])
        x = (TF.pil_to_tensor(img)[None].to(sd.device, sd.dtype) / 255 - 0.5) / 0.5  # (1, 3, H, W) in [-1, 1]
        with torch.no_grad():
            mean, _ = sd.vae.encode(x)                                            # (1, 4, H/8, W/8)
        meta = {"class": item.label, "source": item.path.name, "source_sha256": sha256_file(item.path)}
        image = latents_to_images(sd, sd.vae.scale * mean)[0]                    # D(mean), RGB uint8
        lines.append(write_image_file(out, f"{item.label}/{item.path.stem}.png", image, meta))
    write_text_atomic(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))


# ---------------------------------------------------------------- 6. FID / KID

def _fid_config(ctx: Context):
    return replace(ctx.cfg.fid, inception_weights=str(resolve_path(ctx.cfg.fid.inception_weights)),
                   cache_dir=str(ctx.out / "cache" / "fid"))


def stage_fid(ctx: Context, split: Split, fold: int, sets: dict[str, str], inputs_sha: str,
              units: list[int]) -> dict | None:
    """`meddap fid` (meddap.fid.score_sets) of each set against the fold's real training images:
    set i is one unit (OUT/fold{k}/fid/set{i}.json); rank 0 assembles OUT/fold{k}/fid/fid.json."""
    from meddap.fid import resolve_feature_space, score_sets
    from meddap.settings import toml_label

    folder = ctx.out / f"fold{fold}" / "fid"
    fid_cfg = _fid_config(ctx)
    space = resolve_feature_space(fid_cfg, toml_label("fid"))      # "auto" turns inception once the weights appear
    st = Stage(folder, f"fold{fold}/fid", {"fid": ctx.cfg.section_dict("fid"), "space": space.value,
                                           "inputs": inputs_sha}, _log, prepare=False)
    if st.done():
        return st.record["result"]
    names = list(sets)
    for i in units:
        part = folder / f"set{i}.json"
        if not part.is_file():
            result = score_sets(fid_cfg, f"{split.path}:{fold}:train", {names[i]: sets[names[i]]},
                                label=toml_label("fid"))
            write_json_atomic(part, _without_cache_flags(result))
    return None


def finish_fid(ctx: Context, fold: int, sets: dict[str, str], inputs_sha: str) -> dict | None:
    """Rank 0: fid.json from the per-set files, once all are there."""
    import json as _json

    from meddap.fid import resolve_feature_space
    from meddap.settings import toml_label

    folder = ctx.out / f"fold{fold}" / "fid"
    space = resolve_feature_space(_fid_config(ctx), toml_label("fid"))
    st = Stage(folder, f"fold{fold}/fid", {"fid": ctx.cfg.section_dict("fid"), "space": space.value,
                                           "inputs": inputs_sha}, _log, prepare=False)
    if st.done():
        return st.record["result"]
    parts = [folder / f"set{i}.json" for i in range(len(sets))]
    if not all(p.is_file() for p in parts):
        return None
    results = [_json.loads(p.read_text(encoding="utf-8")) for p in parts]
    result = {**results[0], "sets": {k: v for r in results for k, v in r["sets"].items()}}
    write_json_atomic(folder / "fid.json", result)
    st.finish({"result": result})
    return result


def _without_cache_flags(result: dict) -> dict:
    """Whether features came from the cache depends on which unit ran first: not a result."""
    result = {**result, "reference": {k: v for k, v in result["reference"].items() if k != "from_cache"}}
    result["sets"] = {n: {k: v for k, v in row.items() if k != "from_cache"} for n, row in result["sets"].items()}
    return result


def prepare_fid(ctx: Context, fold: int, inputs_sha: str) -> None:
    """Rank 0: empty a fid folder whose inputs changed, before any rank writes a set file into it."""
    from meddap.fid import resolve_feature_space
    from meddap.settings import toml_label

    space = resolve_feature_space(_fid_config(ctx), toml_label("fid"))
    Stage(ctx.out / f"fold{fold}" / "fid", f"fold{fold}/fid", {"fid": ctx.cfg.section_dict("fid"),
                                                               "space": space.value, "inputs": inputs_sha},
          _log).done()


def stage_memorization(ctx: Context, split: Split, fold: int, adjective: str, folder: str, inputs_sha: str) -> dict:
    """`meddap memorization` of one synthetic set against the fold's training images, the
    fold's test images setting the threshold; OUT/fold{k}/memorization/{adjective}.json and
    .png (the closest pairs). Feature space and weights as [fid] says."""
    from meddap.data.expand import adjective_folder
    from meddap.fid.memorization import MemorizationConfig, closest_grid, memorization
    from meddap.settings import toml_label

    out = ctx.out / f"fold{fold}" / "memorization"
    name = adjective_folder(adjective)
    fid = _fid_config(ctx)
    cfg = MemorizationConfig(synthetic=folder, train=f"{split.path}:{fold}:train", test=f"{split.path}:{fold}:test",
                             features=fid.features, inception_weights=fid.inception_weights,
                             cache_dir=fid.cache_dir, device=fid.device, quiet=fid.quiet)
    st = Stage(out / name, f"fold{fold}/memorization/{name}", {"fid": ctx.cfg.section_dict("fid"),
                                                               "inputs": inputs_sha}, _log)
    if st.done():
        return st.record["result"]
    result = memorization(cfg, label=toml_label("fid"))
    result["closest"] = [{**p, "synthetic": os.path.relpath(p["synthetic"], ctx.out),
                          "train": os.path.relpath(p["train"], ctx.out)} for p in result["closest"]]
    closest_grid({**result, "closest": [{**p, "synthetic": ctx.out / p["synthetic"], "train": ctx.out / p["train"]}
                                        for p in result["closest"]]}, out / name / "closest.png")
    summary = {k: result[k] for k in ("feature_space", "n_synthetic", "n_train", "n_test", "threshold",
                                      "n_flagged", "fraction_flagged", "test_to_train_quantiles",
                                      "synthetic_to_train_quantiles")}
    write_json_atomic(out / name / "memorization.json", result)
    st.finish({"result": {**summary, "grid": str(out / name / "closest.png")}})
    return st.record["result"]


# ---------------------------------------------------------------- 7-8. classifiers and Grad-CAM

def classify_units(ctx: Context, data: Data, split: Split, fold: int, synthetic: Synthetic) -> list:
    """The fold's cells in their canonical order, (fold, network, condition, seed, CellSpec):
    per network and seed, real only, [classic], real + synthetic per (adjective, ratio),
    [classic + synthetic]. Each seed has its own init.pt, shared by that seed's conditions."""
    from meddap.classify.cells import DATASET_A, DATASET_B, SYNTHETIC, CellSpec
    from meddap.classify.train import Augment, TrainConfig

    c, g = ctx.cfg.classify, ctx.cfg.generate
    fold_dir = ctx.out / f"fold{fold}"
    part = f"{split.path}:{fold}"
    tests = ((DATASET_A, f"{part}:test"),) + (((DATASET_B, data.unseen),) if data.unseen else ())
    fig1a = tuple((SYNTHETIC + adj, synthetic.folders[adj][max(g.ratios)])
                  for adj in g.adjectives)       # real-only networks on each synthetic set
    synthetic_conditions = [(a, r) for a in g.adjectives for r in g.ratios]
    conditions = ([(None, 0.0, Augment.NONE)] + ([(None, 0.0, Augment.CLASSIC)] if c.classic else [])
                  + [(a, r, Augment.NONE) for a, r in synthetic_conditions]
                  + ([(a, r, Augment.CLASSIC) for a, r in synthetic_conditions] if c.classic_synthetic else []))
    seeds = c.run_seeds()
    units = []
    for arch in c.networks:
        for seed in seeds:
            net_dir = fold_dir / "classify" / arch.value / (f"seed{seed}" if len(seeds) > 1 else "")
            for adjective, ratio, augment in conditions:
                train = (f"{part}:train",) + (() if adjective is None else (synthetic.folders[adjective][ratio],))
                train_cfg = stage_config(TrainConfig, c, arch=arch, train=train, val=f"{part}:val", seed=seed,
                                         augment=augment, out=net_dir, init=net_dir / "init.pt",
                                         weights_dir=resolve_path("weights"))
                spec = CellSpec(train=train_cfg, fold=fold, adjective=adjective, ratio=ratio,
                                tests=tests + (fig1a if adjective is None and augment is Augment.NONE else ()))
                spec = replace(spec, train=replace(train_cfg, out=net_dir / spec.condition))
                units.append((fold, arch, spec.condition, seed, spec))
    return units


def _classify_stage(ctx: Context, data: Data, split: Split, fold: int, synthetic: Synthetic,
                    check: Check | None, prepare: bool) -> Stage:
    inputs = {"classify": ctx.cfg.section_dict("classify"), "synthetic_sha256": synthetic.sha256,
              "data": data.real_sha256, "unseen": data.unseen_sha256, "split": split.sha256, "fold": fold,
              "check": check.folders if check else {}, "check_sha256": check.sha256 if check else ""}
    return Stage(ctx.out / f"fold{fold}" / "classify", f"fold{fold}/classify", inputs, _log, prepare=prepare)


def run_classify_unit(ctx: Context, unit) -> None:
    """One result cell via meddap.classify.cells.run_cell, trained as `meddap classify train`
    with [classify]; skipped when complete."""
    from meddap.classify.cells import cell_path, run_cell

    fold, arch, name, seed, spec = unit
    _log(f"fold {fold}: classifier {arch.value} on {name} (seed {seed})")
    run_cell(spec, cell_path(ctx.out / f"fold{fold}" / "classify", arch, name, fold, seed))


def finish_classify(ctx: Context, data: Data, split: Split, fold: int, synthetic: Synthetic,
                    check: Check | None) -> dict | None:
    """Rank 0: summary.json from the cells (once all are there); the real-only network also
    scores the check sets."""
    from meddap.classify.cells import cell_path, condition_name, read_cell
    from meddap.classify.evaluate import evaluate

    st = _classify_stage(ctx, data, split, fold, synthetic, check, prepare=False)
    if st.done():
        return st.record["result"]
    fold_dir = ctx.out / f"fold{fold}"
    result: dict = {"cells": {}, "models": {}, "check": {}}
    units = classify_units(ctx, data, split, fold, synthetic)
    first_seed = ctx.cfg.classify.run_seeds()[0]
    for _, arch, name, seed, spec in units:
        cell = read_cell(cell_path(fold_dir / "classify", arch, name, fold, seed))
        if cell is None:
            return None
        if seed == first_seed:
            result["cells"][f"{arch.value}/{name}"] = {t: cell["evaluations"][t]["accuracy"]
                                                       for t in cell["evaluations"]}
            result["models"][f"{arch.value}/{name}"] = str(spec.train.out)
    if check:
        real_only = {arch: spec.train.out for _, arch, name, seed, spec in units
                     if seed == first_seed and name == condition_name(None, 0.0)}
        for arch in ctx.cfg.classify.networks:
            for kind, folder in check.folders.items():
                r = evaluate(real_only[arch], folder, device=ctx.cfg.classify.device)
                result["check"][f"{arch.value}/{kind}"] = {"accuracy": r["accuracy"], "confusion": r["confusion"],
                                                           "classes": r["model_classes"], "n": r["n"]}
        result["spread"] = {kind: check_spread(folder) for kind, folder in check.folders.items()}
    write_json_atomic(fold_dir / "classify" / "summary.json", result)
    st.finish({"result": result})
    return result


def check_spread(folder: Path) -> dict:
    """How grey a check set is: `channel_spread` (0 for grey) of all its images and per class
    (each image read once)."""
    import torch

    from meddap.pretrain.evaluate import channel_spread, read_images

    per_class = {c.name: read_images(sorted(c.glob("*.png")))                     # (N_c, 3, H, W)
                 for c in sorted(Path(folder).iterdir()) if c.is_dir()}
    return {"all": channel_spread(torch.cat(list(per_class.values()))),
            **{c: channel_spread(x) for c, x in per_class.items()}}


def stage_gradcam(ctx: Context, split: Split, fold: int, classified: dict) -> list[str]:
    """Grad-CAM panels (real-only vs the best real+synthetic network) on a few test images,
    taken round-robin over the classes."""
    from meddap.classify.cells import CLASSIC, condition_name
    from meddap.classify.gradcam import write_gradcam_panels

    n = ctx.cfg.classify.gradcam_images
    fold_dir = ctx.out / f"fold{fold}"
    folder = fold_dir / "gradcam"
    st = Stage(folder, f"fold{fold}/gradcam", {"classified": json_sha256(classified), "n": n}, _log)
    if not n or st.done():
        return sorted(str(p) for p in folder.glob("*.png"))
    manifest = json.loads(Path(split.path).read_text(encoding="utf-8"))
    test = manifest["folds"][fold]["test"]
    by_class = {c: [e for e in test if e["class"] == c] for c in manifest["classes"]}
    picked = [by_class[c][i] for i in range(n) for c in by_class if i < len(by_class[c])][:n]
    root = (Path(split.path).parent / manifest.get("root", ".")).resolve()   # the split's root is relative to it
    mini = {**manifest, "root": str(root), "folds": [{"train": [], "val": [], "test": picked}]}
    write_json_atomic(folder / "images.json", mini)
    net = ctx.cfg.classify.networks[0].value
    baselines = {f"{net}/{condition_name(None, 0.0)}", f"{net}/{CLASSIC}"}
    cells = {k: v["dataset_a"] for k, v in classified["cells"].items() if k.startswith(f"{net}/")}
    best = max((k for k in cells if k not in baselines), key=cells.get, default=None)
    models = [classified["models"][f"{net}/{condition_name(None, 0.0)}"]]
    if best is not None:
        models.append(classified["models"][best])
    write_gradcam_panels(models, f"{folder / 'images.json'}:0:test", folder, device=ctx.cfg.classify.device)
    st.finish()
    return sorted(str(p) for p in folder.glob("*.png"))


# ---------------------------------------------------------------- the whole run

class _Progress:
    """One line per finished unit of a stage on this rank: count, elapsed time, ETA."""

    def __init__(self, name: str, units: int, ranks: Ranks):
        self.name, self.total, self.done, self.t0 = name, len(ranks.mine(range(units))), 0, time.monotonic()
        _log(f"stage {name}: {units} unit(s) on {ranks.world} rank(s), {self.total} here")

    def tick(self) -> None:
        from meddap.progress import format_seconds

        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        _log(f"stage {self.name}: {self.done}/{self.total} here, {format_seconds(elapsed)} elapsed, "
             f"ETA {format_seconds(eta)}")


def run(cfg: RunConfig, out: str | Path | None = None, ranks: Ranks | None = None) -> Path | None:
    """Run (or resume) every stage of `cfg` on this rank; return the path of report.md
    (None on a shard that stopped at a stage waiting for another shard)."""
    global _RANKS
    ranks = ranks or Ranks()
    _RANKS = ranks
    out = Path(out or cfg.run.out)
    checkpoint = resolve_path(cfg.lora.checkpoint)
    if not checkpoint.exists():
        raise MeddapError(f"[lora] checkpoint = {cfg.lora.checkpoint!r}: {checkpoint} does not exist; "
                          f"put the SD v1.4 file there (see weights/README.md) or use the shipped tiny base "
                          f"weights/tiny/tiny-sd.safetensors.")
    preflight(cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if ranks.is_main:
        write_json_atomic(out / "config.json", {s: cfg.section_dict(s) for s in
                                                ("run", "data", "lora", "generate", "fid", "classify")})
    ctx = Context(cfg=cfg, out=out, checkpoint=checkpoint, base_sha256=sha256_file(checkpoint), ranks=ranks)
    try:
        report = _stages(ctx, t0)
    except NotReady as e:
        _log(f"shard {ranks.rank}/{ranks.world}: stopping at {e}, which waits for other shards; run the shards "
             f"again, or `meddap run` without --shard to finish and assemble the tables.")
        return None
    if report is not None:
        _log(f"done in {time.monotonic() - t0:.0f} s; report: {report}")
    return report


def _ready(value, name: str):
    if value is None:
        raise NotReady(name)
    return value


def _stages(ctx: Context, t0: float) -> Path | None:
    from meddap.data.datasets import scan_folder

    cfg, ranks = ctx.cfg, ctx.ranks
    folds = range(cfg.data.folds)
    g = cfg.generate
    with ranks.step("data"):
        stage_data(ctx)
    data = _ready(stage_data(ctx), "data")
    with ranks.step("split"):
        stage_split(ctx, data)
    split = _ready(stage_split(ctx, data), "split")
    classes = scan_folder(data.real).classes

    bar = _Progress("lora", len(folds), ranks)
    with ranks.step("lora"):
        for k in ranks.mine(folds):
            stage_lora(ctx, split, k, work=True)
            bar.tick()
    loras = [_ready(stage_lora(ctx, split, k, work=False), f"lora of fold {k}") for k in folds]

    _log(f"stage expand: {len(folds)} fold(s), image chunks on {ranks.world} rank(s)")
    with ranks.step("expand"):
        for k in folds:
            stage_expand(ctx, split, k, loras[k], work=True)
    synthetic = [_ready(stage_expand(ctx, split, k, loras[k], work=False), f"expansion of fold {k}")
                 for k in folds]

    check = None
    if g.check_images:
        with ranks.step("check"):
            stage_check(ctx, classes, split, loras[0], work=True)
        check = _ready(stage_check(ctx, classes, split, loras[0], work=False), "check")

    top = max(g.ratios)
    fid_sets, fid_inputs = {}, {}
    for k in folds:
        sets = {f"{adj} (x{top:g})": synthetic[k].folders[adj][top] for adj in g.adjectives}
        if k == 0 and check:
            sets.update({f"check/{kind}": f for kind, f in check.folders.items()})
        fid_sets[k] = sets
        fid_inputs[k] = json_sha256([synthetic[k].sha256, check.sha256 if check and k == 0 else "", split.sha256])
    with ranks.step("fid-prepare"):
        if ranks.is_main:
            for k in folds:
                prepare_fid(ctx, k, fid_inputs[k])
    fid_units = [(k, i) for k in folds for i in range(len(fid_sets[k]))]
    bar = _Progress("fid", len(fid_units), ranks)
    with ranks.step("fid"):
        for k, i in ranks.mine(fid_units):
            stage_fid(ctx, split, k, fid_sets[k], fid_inputs[k], [i])
            bar.tick()
    fids = {}
    with ranks.step("fid-finish"):
        if ranks.is_main:
            fids = {k: finish_fid(ctx, k, fid_sets[k], fid_inputs[k]) for k in folds}

    mem_units = [(k, adj) for k in folds for adj in g.adjectives]
    bar = _Progress("memorization", len(mem_units), ranks)
    with ranks.step("memorization"):
        for k, adj in ranks.mine(mem_units):
            stage_memorization(ctx, split, k, adj, synthetic[k].folders[adj][top], fid_inputs[k])
            bar.tick()
    memorized = {}
    if ranks.is_main:                   # every unit is done (its stage.json): read the results
        memorized = {k: {adj: stage_memorization(ctx, split, k, adj, synthetic[k].folders[adj][top], fid_inputs[k])
                         for adj in g.adjectives} for k in folds}

    with ranks.step("classify-prepare"):
        if ranks.is_main:
            for k in folds:
                _classify_stage(ctx, data, split, k, synthetic[k], check if k == 0 else None, prepare=True).done()
    cls_units = [u for k in folds for u in classify_units(ctx, data, split, k, synthetic[k])]
    bar = _Progress("classify", len(cls_units), ranks)
    with ranks.step("classify"):
        for unit in ranks.mine(cls_units):
            run_classify_unit(ctx, unit)
            bar.tick()
    classified = {}
    with ranks.step("classify-finish"):
        if ranks.is_main:
            classified = {k: finish_classify(ctx, data, split, k, synthetic[k], check if k == 0 else None)
                          for k in folds}
    report = None
    with ranks.step("report"):              # rank 0 draws Grad-CAM, the tables and the report
        if ranks.is_main:
            report = _report(ctx, t0, data, split, loras, check, fids, classified, memorized)
    return report


def _report(ctx: Context, t0: float, data: Data, split: Split, loras: list, check: Check | None,
            fids: dict, classified: dict, memorized: dict) -> Path:
    from meddap.classify.tables import write_tables
    from meddap.pipeline.report import write_report

    cfg, out, folds = ctx.cfg, ctx.out, range(ctx.cfg.data.folds)
    for k in folds:
        _ready(fids[k], f"fid of fold {k}")
        _ready(classified[k], f"classifiers of fold {k}")
    gradcams = {k: stage_gradcam(ctx, split, k, classified[k]) for k in folds}
    tables = [str(p) for p in write_tables(collect_cells(out, cfg.data.folds), out / "tables")]
    return write_report(cfg, out, {
        "data": asdict(data), "split": split.path, "base_sha256": ctx.base_sha256, "tables": tables,
        "seconds": round(time.monotonic() - t0, 1),
        "folds": [{"fold": k, "lora": str(loras[k].path), "lora_sha256": loras[k].sha256, "fid": fids[k],
                   "classify": classified[k], "gradcam": gradcams[k], "memorization": memorized[k],
                   "check": check.folders if (check and k == 0) else None} for k in folds]})


RESULTS_MANIFEST = "results.json"


def collect_cells(out: Path, folds: int) -> Path:
    """OUT/results/cells/<network>/<condition>/fold<k>.json: the current cells of every fold
    (each fold's classify stage keeps its own, so a redone stage never leaves stale cells).

    OUT/results/results.json lists the files copied; a re-run removes only those, and
    refuses a results/ folder holding files it did not write."""
    import json
    import shutil

    results = out / "results"
    manifest = results / RESULTS_MANIFEST
    ours = set(json.loads(manifest.read_text(encoding="utf-8"))["files"]) if manifest.is_file() else set()
    if results.exists():
        foreign = sorted(p.relative_to(results).as_posix() for p in results.rglob("*")
                         if p.is_file() and p != manifest and p.relative_to(results).as_posix() not in ours)
        if foreign:
            raise MeddapError(f"{results} holds files meddap did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); move them, or choose another --out.")
        for rel in ours:
            (results / rel).unlink(missing_ok=True)
    copied = []
    for k in range(folds):
        for cell in sorted((out / f"fold{k}" / "classify" / "cells").rglob("fold*.json")):
            rel = cell.relative_to(out / f"fold{k}" / "classify")
            dest = results / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cell, dest)
            copied.append(rel.as_posix())
    write_json_atomic(manifest, {"files": copied})
    return results
