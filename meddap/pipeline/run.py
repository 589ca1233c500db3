"""`meddap run CONFIG`: the paper's protocol (MEDDAP Fig. 1) as resumable stages.

1. data      real images (a BUSI-layout folder, or the phantom written to OUT/data/real)
             and an optional unseen set (OUT/data/unseen: phantom site b);
2. split     leakage-safe folds (OUT/split.json);
   per fold k (OUT/fold{k}/):
3. lora      USLoRA on the fold's training images only (meddap.lora.train);
4. expand    per adjective: int(count x ratio) images per class and ratio, from
             the adapted base (OUT/fold{k}/synthetic/{adjective}/ratio_{r}/train/{class});
5. check     (generate.check_images > 0, fold 0) the same prompts and seeds with and
             without the adapters: OUT/synthetic/{class}, OUT/synthetic_base/{class};
6. fid       FID/KID of each synthetic set vs the fold's real training images (or the
             pixel substitute, NOT FID, when the FID Inception weights are absent);
7. classify  per network: real-only and real+synthetic per (adjective, ratio); scored on
             the fold's test part and the unseen set (meddap.classify.tables cells);
             the real-only network also scores the check sets (paper Fig. 1a);
8. gradcam   overlays of the real-only and the best real+synthetic network;
then tables (meddap.classify.tables) and OUT/report.md (meddap.pipeline.report).
Each stage writes stage.json with the hashes of its inputs (stages.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from meddap.errors import MeddapError
from meddap.io import sha256_file, write_json_atomic
from meddap.pipeline.config import DataSource, FeatureSpace, RunConfig, resolve_path
from meddap.pipeline.stages import Stage, json_sha256, tree_sha256

PIXEL_FEATURE_SIDE = 16     # substitute features: 16 x 16 grey thumbnails = 256 dimensions


def _log(msg: str) -> None:
    print(f"meddap run: {msg}", flush=True)


# ---------------------------------------------------------------- 1-2. data and split

def stage_data(cfg: RunConfig, out: Path) -> dict:
    """The real (and unseen) image folders and their content hashes."""
    from meddap.data.phantom import Site, write_phantom

    d = cfg.data
    if d.source is DataSource.FOLDER:
        real = resolve_path(d.path)
        if not real.is_dir():
            raise MeddapError(f"[data] path = {d.path!r}: folder {real} does not exist; put the BUSI class "
                              f"folders (benign/, malignant/, normal/) there or change [data] path.")
        unseen = resolve_path(d.unseen) if d.unseen else None
        if unseen is not None and not unseen.is_dir():
            raise MeddapError(f"[data] unseen = {d.unseen!r}: folder {unseen} does not exist; "
                              f"give the Dataset B folder (benign/, malignant/) or \"\" for none.")
        return {"real": str(real), "real_sha256": tree_sha256(real),
                "unseen": str(unseen) if unseen else "", "unseen_sha256": tree_sha256(unseen) if unseen else ""}
    st = Stage(out / "data", "data", {"data": cfg.section_dict("data"), "seed": cfg.run.seed}, _log)
    if not st.done():
        write_phantom(out / "data" / "real", seed=cfg.run.seed, site=Site.A, size=d.phantom_size,
                      counts=d.phantom_counts, show_progress=False)
        if d.unseen_phantom_counts:
            write_phantom(out / "data" / "unseen", seed=cfg.run.seed, site=Site.B, size=d.phantom_size,
                          counts=d.unseen_phantom_counts, show_progress=False)
        st.finish()
    unseen = out / "data" / "unseen"
    return {"real": str(out / "data" / "real"), "real_sha256": st.outputs_sha256,
            "unseen": str(unseen) if unseen.is_dir() else "", "unseen_sha256": st.outputs_sha256}


def stage_split(cfg: RunConfig, out: Path, data: dict) -> str:
    from meddap.data.splits import SplitConfig, write_split

    d = cfg.data
    st = Stage(out / "split", "split", {"real_sha256": data["real_sha256"], "folds": d.folds, "val": d.val,
                                        "test": d.test, "seed": cfg.run.seed}, _log)
    if not st.done():
        write_split(data["real"], out / "split" / "split.json",
                    SplitConfig(val=d.val, test=d.test, folds=d.folds, seed=cfg.run.seed), show_progress=False)
        st.finish()
    return str(out / "split" / "split.json")


# ---------------------------------------------------------------- 3. USLoRA

def stage_lora(cfg: RunConfig, fold_dir: Path, split: str, fold: int, base_sha: str, split_sha: str) -> tuple[Path, str]:
    from meddap.lora.train import LoRARunConfig, train_lora

    lo = cfg.lora
    targets = lo.targets[0] if len(lo.targets) == 1 and lo.targets[0] in ("cross", "all") else tuple(lo.targets)
    run_cfg = LoRARunConfig(
        checkpoint=str(resolve_path(lo.checkpoint)), data=f"{split}:{fold}:train", out=str(fold_dir / "lora"),
        rank=lo.rank, alpha=lo.alpha or None, targets=targets, lr=lo.lr, epochs=lo.epochs,
        max_steps=lo.max_steps or None, batch_size=lo.batch_size, resolution=lo.resolution,
        seed=cfg.run.seed, device=cfg.run.device, cache_latents=lo.cache_latents,
        checkpoint_every=lo.checkpoint_every, as_released=lo.as_released)
    st = Stage(fold_dir / "lora", f"fold{fold}/lora", {"lora": cfg.section_dict("lora"), "base_sha256": base_sha,
                                                       "split_sha256": split_sha, "fold": fold,
                                                       "seed": cfg.run.seed}, _log)
    if not st.done():
        train_lora(run_cfg)
        st.finish()
    path = fold_dir / "lora" / "lora.safetensors"
    return path, sha256_file(path)


# ---------------------------------------------------------------- 4-5. generation

def load_model(cfg: RunConfig, lora_path: Path | None):
    """The base (and its adapters, when given), ready to sample."""
    import torch

    from meddap.lora import load_lora
    from meddap.models.stable_diffusion import load_stable_diffusion

    sd = load_stable_diffusion(resolve_path(cfg.lora.checkpoint), device=cfg.run.device, dtype=torch.float32)
    if lora_path is not None:
        info = load_lora(sd.unet, lora_path)
        sd.lora_sha256 = info["sha256"]
    return sd


def generate_folder(sd, cfg: RunConfig, jobs: list[tuple[Path, str, int]]) -> None:
    """Write each (path, prompt, seed) image unless a complete PNG is already there (resume)."""
    from meddap.sampling.text_to_image import generate, read_png_metadata, write_png

    def finished(path: Path) -> bool:
        try:
            return path.is_file() and "seed" in read_png_metadata(path)
        except Exception:                    # a truncated file is redone
            return False

    todo = [j for j in jobs if not finished(j[0])]
    g = cfg.generate
    for start in range(0, len(todo), g.batch_size * 4):
        chunk = todo[start:start + g.batch_size * 4]
        results = generate(sd, [p for _, p, _ in chunk], [s for _, _, s in chunk], sampler=g.sampler,
                           steps=g.steps, guidance=g.guidance, height=g.size, width=g.size,
                           batch_size=g.batch_size, show_progress=False)
        for (path, _, _), r in zip(chunk, results):
            write_png(path, r.image, r.metadata)


def stage_expand(cfg: RunConfig, fold_dir: Path, split: str, fold: int, lora: tuple[Path, str]) -> dict:
    """`meddap expand` (meddap.data.expand) on the fold's training images, into
    OUT/fold{k}/synthetic/{adjective|no_adjective}/ratio_{r}/train/{class}/: int(count x ratio)
    images per class; image i of a class is the same picture at every ratio. The base seed of
    fold k is image_seed(run seed, k)."""
    from meddap.data.datasets import resolve_images
    from meddap.data.expand import ExpandConfig, adjective_folder, expand, ratio_folder
    from meddap.sampling.text_to_image import image_seed

    g = cfg.generate
    out = fold_dir / "synthetic"
    counts = resolve_images(f"{split}:{fold}:train").counts()
    st = Stage(out, f"fold{fold}/expand", {"generate": cfg.section_dict("generate"),
                                           "lora_sha256": lora[1], "counts": counts,
                                           "as_released": cfg.lora.as_released}, _log)
    if not st.done():
        _log(f"fold {fold}: expanding with {len(g.adjectives)} adjective(s) x ratios {list(g.ratios)}")
        expand(ExpandConfig(checkpoint=str(resolve_path(cfg.lora.checkpoint)), data=f"{split}:{fold}:train",
                            out=str(out), lora=str(lora[0]), ratios=tuple(g.ratios),
                            adjectives=tuple(g.adjectives), as_released=cfg.lora.as_released,
                            sampler=g.sampler, steps=g.steps, guidance=g.guidance, height=g.size,
                            width=g.size, seed=image_seed(cfg.run.seed, fold), batch_size=g.batch_size,
                            device=cfg.run.device, quiet=True))
        st.finish()
    return {adj: {r: str(out / adjective_folder(adj) / ratio_folder(r) / "train") for r in g.ratios}
            for adj in g.adjectives} | {"_sha256": st.outputs_sha256}


def stage_check(cfg: RunConfig, out: Path, classes: list[str], lora: tuple[Path, str]) -> tuple[dict, str]:
    """The adaptation check of the demo: the same prompts and seeds through the adapted
    base (OUT/synthetic/{class}) and the base alone (OUT/synthetic_base/{class})."""
    from meddap.data.prompts import prompt_for
    from meddap.sampling.text_to_image import image_seed

    n = cfg.generate.check_images
    folders = {"adapted": out / "synthetic", "base": out / "synthetic_base"}
    st = Stage(out / "check", "check", {"generate": cfg.section_dict("generate"), "lora_sha256": lora[1],
                                        "classes": classes}, _log, owns=tuple(folders.values()))
    if not st.done():
        for kind, folder in folders.items():
            sd = load_model(cfg, lora[0] if kind == "adapted" else None)
            jobs = [(folder / cls / f"{cls}_{i:04d}.png", prompt_for(cls, as_released=cfg.lora.as_released),
                     image_seed(cfg.run.seed * 7 + c, i)) for c, cls in enumerate(classes) for i in range(n)]
            _log(f"check: {len(jobs)} images from the {kind} model")
            generate_folder(sd, cfg, jobs)
        st.finish({"sha256": {k: tree_sha256(f) for k, f in folders.items()}})
    return {k: str(f) for k, f in folders.items()}, json_sha256(st.record["sha256"])


# ---------------------------------------------------------------- 6. FID / KID

def _features(folder_spec: str, cfg: RunConfig, space: FeatureSpace) -> tuple[np.ndarray, list[str]]:
    """(N, D) features of a folder or split part, and the labels."""
    from meddap.data.datasets import load_rgb, resolve_images

    image_set = resolve_images(folder_spec)
    if space is FeatureSpace.INCEPTION:
        from meddap.fid import inception_features, load_fid_inception
        from meddap.fid.inception import load_image_01
        net = load_fid_inception(resolve_path(cfg.fid.inception_weights), cfg.run.device)
        feats = np.concatenate([inception_features(load_image_01(it.path)[None], net) for it in image_set.items])
    else:
        s = PIXEL_FEATURE_SIDE
        feats = np.stack([np.asarray(load_rgb(it.path).convert("L").resize((s, s)), np.float64).ravel() / 255.0
                          for it in image_set.items])                                  # (N, 256)
    return feats, [it.label for it in image_set.items]


def feature_space(cfg: RunConfig) -> FeatureSpace:
    if cfg.fid.features is FeatureSpace.AUTO:
        return (FeatureSpace.INCEPTION if resolve_path(cfg.fid.inception_weights).is_file()
                else FeatureSpace.PIXELS)
    if cfg.fid.features is FeatureSpace.INCEPTION and not resolve_path(cfg.fid.inception_weights).is_file():
        raise MeddapError(f"[fid] features = \"inception\" but [fid] inception_weights = "
                          f"{cfg.fid.inception_weights!r} does not exist; put pytorch-fid's weight file "
                          f"there or set features = \"auto\" (falls back to the pixel substitute, not FID).")
    return cfg.fid.features


def stage_fid(cfg: RunConfig, fold_dir: Path, split: str, fold: int, sets: dict[str, str], inputs_sha: str) -> dict:
    from meddap.fid import feature_statistics, frechet_distance, kid

    space = feature_space(cfg)
    st = Stage(fold_dir / "fid", f"fold{fold}/fid", {"fid": cfg.section_dict("fid"), "space": space.value,
                                                     "inputs": inputs_sha}, _log)
    if st.done():
        return st.record["result"]
    real, _ = _features(f"{split}:{fold}:train", cfg, space)
    mu_r, sig_r = feature_statistics(real)
    result = {"feature_space": space.value, "is_fid": space is FeatureSpace.INCEPTION, "sets": {}}
    for name, folder in sets.items():
        feats, _ = _features(folder, cfg, space)
        mu, sig = feature_statistics(feats)
        row = {"frechet": frechet_distance(mu_r, sig_r, mu, sig), "n": len(feats)}
        if cfg.fid.kid:
            k = kid(real, feats, subset_size=min(len(real), len(feats), 100))
            row["kid"], row["kid_std"] = float(k.mean), float(k.std)
        result["sets"][name] = row
    write_json_atomic(fold_dir / "fid" / "fid.json", result)
    st.finish({"result": result})
    return result


# ---------------------------------------------------------------- 7-8. classifiers and Grad-CAM

def stage_classify(cfg: RunConfig, out: Path, fold_dir: Path, split: str, fold: int, data: dict,
                   synthetic: dict, check: dict | None, check_sha: str) -> dict:
    """One result cell per (network, condition) via meddap.classify.tables.run_cell; the
    real-only network also scores the check sets. Cells are skipped when complete."""
    from meddap.classify.evaluate import evaluate
    from meddap.classify.networks import parse_arch
    from meddap.classify.tables import CellSpec, cell_path, condition_name, run_cell
    from meddap.classify.train import TrainConfig

    c = cfg.classify
    inputs = {"classify": cfg.section_dict("classify"), "synthetic_sha256": synthetic["_sha256"],
              "data": data["real_sha256"], "unseen": data["unseen_sha256"], "split": split, "fold": fold,
              "check": check or {}, "check_sha256": check_sha}
    st = Stage(fold_dir / "classify", f"fold{fold}/classify", inputs, _log)
    if st.done():
        return st.record["result"]
    from meddap.classify.tables import DATASET_A, DATASET_B, SYNTHETIC

    tests = (((DATASET_A, f"{split}:{fold}:test"),) + (((DATASET_B, data["unseen"]),) if data["unseen"] else ()))
    fig1a = tuple((SYNTHETIC + adj, synthetic[adj][max(cfg.generate.ratios)])
                  for adj in cfg.generate.adjectives)       # real-only networks on each synthetic set
    conditions = [(None, 0.0)] + [(a, r) for a in cfg.generate.adjectives for r in cfg.generate.ratios]
    result: dict = {"cells": {}, "check": {}}
    for net in c.networks:
        arch = parse_arch(net)
        for adjective, ratio in conditions:
            name = condition_name(adjective, ratio)
            train = (f"{split}:{fold}:train",) + (() if adjective is None else (synthetic[adjective][ratio],))
            model_dir = fold_dir / "classify" / net / name
            spec = CellSpec(train=TrainConfig(arch=arch, train=train, val=f"{split}:{fold}:val", out=model_dir,
                                              epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                                              seed=cfg.run.seed, size=c.size, device=cfg.run.device,
                                              init=fold_dir / "classify" / net / "init.pt",
                                              weights_dir=resolve_path("weights"), show_progress=False),
                            fold=fold, adjective=adjective, ratio=ratio,
                            tests=tests + (fig1a if adjective is None else ()))
            _log(f"fold {fold}: classifier {net} on {name}")
            cell = run_cell(spec, cell_path(fold_dir / "classify", arch, name, fold))
            result["cells"][f"{net}/{name}"] = {t: cell["evaluations"][t]["accuracy"] for t in cell["evaluations"]}
        if check:
            real_only = fold_dir / "classify" / net / condition_name(None, 0.0)
            for kind, folder in check.items():
                r = evaluate(real_only, folder, device=cfg.run.device)
                result["check"][f"{net}/{kind}"] = {"accuracy": r["accuracy"], "confusion": r["confusion"],
                                                    "classes": r["model_classes"]}
    write_json_atomic(fold_dir / "classify" / "summary.json", result)
    st.finish({"result": result})
    return result


def stage_gradcam(cfg: RunConfig, fold_dir: Path, split: str, fold: int, classified: dict) -> list[str]:
    """Grad-CAM panels (real-only vs the best real+synthetic network) on a few test images,
    taken round-robin over the classes."""
    import json

    from meddap.classify.gradcam import write_gradcam_panels
    from meddap.classify.tables import condition_name

    n = cfg.classify.gradcam_images
    folder = fold_dir / "gradcam"
    st = Stage(folder, f"fold{fold}/gradcam", {"classified": json_sha256(classified), "n": n}, _log)
    if not n or st.done():
        return sorted(str(p) for p in folder.glob("*.png"))
    manifest = json.loads(Path(split).read_text(encoding="utf-8"))
    test = manifest["folds"][fold]["test"]
    by_class = {c: [e for e in test if e["class"] == c] for c in manifest["classes"]}
    picked = [by_class[c][i] for i in range(n) for c in by_class if i < len(by_class[c])][:n]
    root = (Path(split).parent / manifest.get("root", ".")).resolve()     # the split's root is relative to it
    mini = {**manifest, "root": str(root), "folds": [{"train": [], "val": [], "test": picked}]}
    write_json_atomic(folder / "images.json", mini)
    net = cfg.classify.networks[0]
    cells = {k: v["dataset_a"] for k, v in classified["cells"].items() if k.startswith(f"{net}/")}
    best = max((k for k in cells if not k.endswith("/" + condition_name(None, 0.0))), key=cells.get, default=None)
    models = [str(fold_dir / "classify" / net / condition_name(None, 0.0))]
    if best is not None:
        models.append(str(fold_dir / "classify" / best))
    write_gradcam_panels(models, f"{folder / 'images.json'}:0:test", folder, device=cfg.run.device)
    st.finish()
    return sorted(str(p) for p in folder.glob("*.png"))


# ---------------------------------------------------------------- the whole run

def run(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """Run (or resume) every stage of `cfg`; return the path of report.md."""
    from meddap.classify.tables import write_tables
    from meddap.data.datasets import scan_folder
    from meddap.pipeline.report import write_report

    out = Path(out or cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_path(cfg.lora.checkpoint)
    if not checkpoint.exists():
        raise MeddapError(f"[lora] checkpoint = {cfg.lora.checkpoint!r}: {checkpoint} does not exist; "
                          f"put the SD v1.4 file there (see weights/README.md) or use the shipped tiny base "
                          f"weights/tiny/tiny-sd.safetensors.")
    t0 = time.monotonic()
    write_json_atomic(out / "config.json", {s: cfg.section_dict(s) for s in
                                            ("run", "data", "lora", "generate", "fid", "classify")})
    base_sha = sha256_file(checkpoint)
    data = stage_data(cfg, out)
    split = stage_split(cfg, out, data)
    split_sha = sha256_file(split)
    classes = scan_folder(data["real"]).classes
    folds = []
    for k in range(cfg.data.folds):
        fold_dir = out / f"fold{k}"
        lora = stage_lora(cfg, fold_dir, split, k, base_sha, split_sha)
        synthetic = stage_expand(cfg, fold_dir, split, k, lora)
        check, check_sha = (stage_check(cfg, out, classes, lora) if cfg.generate.check_images and k == 0
                            else (None, ""))
        top = max(cfg.generate.ratios)
        sets = {f"{adj} (x{top:g})": synthetic[adj][top] for adj in cfg.generate.adjectives}
        sets.update({f"check/{kind}": f for kind, f in (check or {}).items()})
        fid = stage_fid(cfg, fold_dir, split, k, sets, json_sha256([synthetic["_sha256"], check_sha, split_sha]))
        classified = stage_classify(cfg, out, fold_dir, split, k, data, synthetic, check, check_sha)
        gradcam = stage_gradcam(cfg, fold_dir, split, k, classified)
        folds.append({"fold": k, "lora": str(lora[0]), "lora_sha256": lora[1], "fid": fid,
                      "classify": classified, "gradcam": gradcam, "check": check})
    tables = [str(p) for p in write_tables(collect_cells(out, cfg.data.folds), out / "tables")]
    report = write_report(cfg, out, {"data": data, "split": split, "base_sha256": base_sha, "folds": folds,
                                     "tables": tables, "seconds": round(time.monotonic() - t0, 1)})
    _log(f"done in {time.monotonic() - t0:.0f} s; report: {report}")
    return report


def collect_cells(out: Path, folds: int) -> Path:
    """OUT/results/cells/<network>/<condition>/fold<k>.json: the current cells of every fold
    (each fold's classify stage keeps its own, so a redone stage never leaves stale cells)."""
    import shutil

    results = out / "results"
    if results.exists():
        shutil.rmtree(results)
    for k in range(folds):
        for cell in sorted((out / f"fold{k}" / "classify" / "cells").rglob("fold*.json")):
            dest = results / cell.relative_to(out / f"fold{k}" / "classify")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cell, dest)
    return results

