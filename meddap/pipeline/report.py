"""OUT/report.md of `meddap run`: sample grids, the USLoRA loss curve, FID/KID,
the classifier tables, the adaptation check and the Grad-CAM overlays.

Pictures are drawn by meddap.figures and written next to the report under
OUT/figures/.
"""
from __future__ import annotations

import os
from pathlib import Path

from meddap.figures import loss_curve, sample_grid, stack_pictures
from meddap.io import write_text_atomic
from meddap.fid import FeatureSpace
from meddap.pipeline.config import RunConfig


def _rel(path: Path | str, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _fid_section(cfg: RunConfig, fold: dict) -> list[str]:
    fid = fold["fid"]
    lines = [f"### Fold {fold['fold']}: distance of each synthetic set to the fold's real training images", ""]
    if fid["feature_space"] == FeatureSpace.PIXELS.value:
        lines += [f"**These are NOT FID values.** The FID Inception weights (`{cfg.fid.inception_weights}`) "
                  f"are not present, so the Fréchet distance and KID are computed on a documented substitute "
                  f"feature map: each image as a 16 x 16 grey thumbnail (256 values in [0, 1], bilinear PIL "
                  f"resize). Compare them only with each other.", ""]
        head = "| set | images | Fréchet distance (pixels, not FID) | KID (pixels, not KID) |"
    else:
        head = "| set | images | FID | KID |"
    prdc = any("precision" in row for row in fid["sets"].values())
    lines += [head + (" precision | recall | density | coverage |" if prdc else ""),
              "|---|---|---|---|" + ("---|---|---|---|" if prdc else "")]
    for name, row in fid["sets"].items():
        k = f"{row['kid']:.4f} ± {row['kid_std']:.4f}" if "kid" in row else "—"
        p = "".join(f" {row[m]:.3f} |" for m in ("precision", "recall", "density", "coverage")) if prdc else ""
        lines.append(f"| {name} | {row['n']} | {row['frechet']:.4f} | {k} |{p}")
    if prdc:
        lines += ["", "Precision: the share of synthetic images inside the real images' k-NN balls (fidelity); "
                      "recall: the share of real images inside the synthetic ones' balls (diversity) "
                      "(Kynkäänniemi et al. 2019, arXiv 1904.06991); density and coverage: the same ideas "
                      "made robust to outliers (Naeem et al. 2020, arXiv 2002.09797), k = "
                      f"{cfg.fid.prdc_k}. 1 is best for all four; density can exceed 1."]
    return lines + [""]


def _memorization_section(out: Path, fold: dict) -> list[str]:
    mem = fold.get("memorization") or {}
    if not mem:
        return []
    lines = [f"### Fold {fold['fold']}: near-copies of training images", "",
             "Each synthetic image's nearest training image (cosine distance; "
             f"{next(iter(mem.values()))['feature_space']} features); flagged when nearer than the 1st percentile "
             "of the test images' distances to the training set (Carlini et al. 2023, arXiv 2301.13188).", "",
             "| set | synthetic | flagged | share | threshold | median distance, synthetic | median, test |",
             "|---|---|---|---|---|---|---|"]
    for adj, r in mem.items():
        lines.append(f"| {adj} | {r['n_synthetic']} | {r['n_flagged']} | {r['fraction_flagged']:.1%} | "
                     f"{r['threshold']:.4f} | {r['synthetic_to_train_quantiles']['50%']:.4f} | "
                     f"{r['test_to_train_quantiles']['50%']:.4f} |")
    for adj, r in mem.items():
        lines += ["", f"Closest pairs, *{adj}* (synthetic above its nearest training image): "
                      f"![closest]({_rel(r['grid'], out)})"]
    return lines + [""]


def _check_section(fold: dict) -> list[str]:
    check = fold["classify"]["check"]
    if not check:
        return []
    lines = ["## Does adaptation work? (the demo's check)", "",
             "A classifier trained on the real images only classifies images generated with the class "
             "prompts, once by the adapted base (USLoRA) and once by the base without adapters (same "
             "prompts, same seeds). The reference: the real test images passed through the base's "
             "autoencoder (encode, decode). Every sample is a decoded latent, so this is what the decoder "
             "keeps of each class; the gap between it and the adapted column is what the adapted UNet "
             "misses (a reference, not a strict bound: guidance can make samples more typical than real "
             "images).", "",
             "| network | adapted: accuracy | unadapted base: accuracy | reference: real test images "
             "through the autoencoder | chance |", "|---|---|---|---|---|"]
    nets = sorted({k.split("/")[0] for k in check})
    for net in nets:
        a, b, r = check[f"{net}/adapted"], check[f"{net}/base"], check[f"{net}/reconstructed"]
        chance = 1 / len(a["classes"])
        lines.append(f"| {net} | **{a['accuracy']:.1%}** | **{b['accuracy']:.1%}** | {r['accuracy']:.1%} "
                     f"({r['n']} images) | {chance:.1%} |")
    spread = fold["classify"].get("spread")             # absent in summaries written before it was added
    if spread:
        names = {"adapted": "adapted", "base": "unadapted base", "reconstructed": "reference"}
        lines += ["", "How grey the samples are: the mean channel spread, max - min over R, G, B per "
                  "pixel, in [0, 1] (the real phantoms are grey, 0):", ""]
        lines += [f"- {names.get(kind, kind)}: **{s['all']:.3f}** ("
                  + ", ".join(f"{c} {v:.3f}" for c, v in s.items() if c != "all") + ")"
                  for kind, s in spread.items()]
    lines += ["", "Confusion matrices (rows: prompted or true class, columns: predicted; order "
              f"{', '.join(check[f'{nets[0]}/adapted']['classes'])}):", ""]
    for net in nets:
        for kind in ("adapted", "base", "reconstructed"):
            lines.append(f"- {net}, {kind}: `{check[f'{net}/{kind}']['confusion']}`")
    return lines + [""]


def write_report(cfg: RunConfig, out: Path, info: dict) -> Path:
    """Draw the figures and write OUT/report.md; returns its path."""
    from meddap.data.datasets import scan_folder

    figures = out / "figures"
    lines = [f"# MEDDAP run `{cfg.run.name}`", "",
             f"Config: `{cfg.source}`; output: `{out}`; wall time of this invocation: {info['seconds']} s "
             f"(stages already done were skipped).", "",
             f"- base checkpoint `{cfg.lora.checkpoint}` (SHA-256 `{info['base_sha256'][:16]}…`)",
             f"- real data `{info['data']['real']}`; split `{_rel(info['split'], out)}` "
             f"({cfg.data.folds} fold(s), val {cfg.data.val}, test {cfg.data.test} images)",
             f"- USLoRA rank {cfg.lora.rank}, targets {cfg.section_dict('lora')['targets']}, lr {cfg.lora.lr:g}, "
             f"{cfg.lora.epochs} epochs{f' (max {cfg.lora.max_steps} steps)' if cfg.lora.max_steps else ''}, "
             f"{cfg.lora.resolution} px"
             f"{f', caption dropout {cfg.lora.caption_dropout:g}' if cfg.lora.caption_dropout else ''}"
             f"{'; new tokens (learned embeddings for the prompt words the base never trained; not in the paper)' if cfg.lora.new_tokens else ''}",
             f"- generation: {cfg.generate.sampler.value} {cfg.generate.steps} steps, guidance {cfg.generate.guidance:g}, "
             f"{cfg.generate.height} x {cfg.generate.width} px, {cfg.generate.dtype}; adjectives {list(cfg.generate.adjectives)}; ratios {list(cfg.generate.ratios)}",
             f"- classifiers {[a.value for a in cfg.classify.networks]}: {cfg.classify.epochs} epochs, batch "
             f"{cfg.classify.batch_size}, lr {cfg.classify.lr:g}, {cfg.classify.size} px", ""]
    fold0 = info["folds"][0]
    lines += _check_section(fold0)

    real = scan_folder(info["data"]["real"])
    rows = [(f"real {c}", [it.path for it in real.items if it.label == c]) for c in real.classes]
    lines += ["## Samples", "", f"![real]({_rel(sample_grid(rows, figures / 'real.png'), out)})", ""]
    if fold0["check"]:
        grids = [figures / "real.png"]
        for kind, folder in fold0["check"].items():
            rows = [(f"{kind} {c}", sorted((Path(folder) / c).glob("*.png"))) for c in real.classes]
            grids.append(sample_grid(rows, figures / f"check_{kind}.png"))
            what = ("Real test images through the base's autoencoder" if kind == "reconstructed"
                    else f"Class prompts, {kind} model")
            lines += [f"{what} (`{_rel(folder, out)}`):", "", f"![{kind}]({_rel(grids[-1], out)})", ""]
        overview = stack_pictures(grids, figures / "overview.png")
        lines += [f"All at once (real, {', '.join(fold0['check'])}): ![overview]({_rel(overview, out)})", ""]
    from meddap.data.expand import adjective_folder, ratio_folder
    for fold in info["folds"]:
        k = fold["fold"]
        for adj in cfg.generate.adjectives:
            train = out / f"fold{k}" / "synthetic" / adjective_folder(adj) / ratio_folder(max(cfg.generate.ratios)) / "train"
            rows = [(f"{adj}: {c}", sorted((train / c).glob("*.png"))) for c in real.classes]
            grid = sample_grid(rows, figures / f"fold{k}_{adjective_folder(adj)}.png")
            lines += [f"Fold {k}, adjective *{adj}*:", "", f"![{adj}]({_rel(grid, out)})", ""]
    lines += ["## USLoRA training loss", ""]
    for fold in info["folds"]:
        curve = loss_curve(Path(fold["lora"]).parent / "log.csv", figures / f"fold{fold['fold']}_lora_loss.png")
        lines += [f"Fold {fold['fold']}: ![loss]({_rel(curve, out)})", ""]
    lines += ["## FID / KID", ""]
    for fold in info["folds"]:
        lines += _fid_section(cfg, fold)
    lines += ["## Memorisation", ""]
    for fold in info["folds"]:
        lines += _memorization_section(out, fold)
    lines += ["## Classifier tables", "",
              "From `meddap tables` on the result cells (`results/cells/`); files in `tables/`.", ""]
    for t in info["tables"]:
        if t.endswith(".md"):
            lines += [Path(t).read_text(encoding="utf-8"), ""]
        elif t.endswith(".png"):
            lines += [f"![{Path(t).stem}]({_rel(t, out)})", ""]
    lines += ["## Grad-CAM", ""]
    for fold in info["folds"]:
        for p in fold["gradcam"]:
            lines += [f"![{Path(p).stem}]({_rel(p, out)})"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
