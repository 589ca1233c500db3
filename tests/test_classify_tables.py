"""Tables 1-3 and Fig. 1a render from the fixture result folder, and their
numbers are the fixture's numbers run through numpy/scipy independently."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from meddap.classify.cells import load_cells
from meddap.classify.tables import build_tables
from meddap.cli import main
from meddap.errors import MeddapError

FIXTURE = Path(__file__).parent / "fixtures" / "classify_results"


def _acc(net, cond, test="dataset_a"):
    files = sorted((FIXTURE / "cells" / net / cond).glob("fold*.json"))
    return [json.loads(f.read_text())["evaluations"][test]["accuracy"] for f in files]


def test_tables_render_from_fixture(tmp_path, capsys):
    assert main(["tables", str(FIXTURE), "--out", str(tmp_path)]) == 0
    for name in ("table1.csv", "table2.csv", "table3.csv", "fig1a.csv", "tables.md",
                 "table1.png", "table2.png", "table3.png", "fig1a.png"):
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / "table1.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 300
    md = (tmp_path / "tables.md").read_text()
    assert "random (no ImageNet weights found) initialisation" in md
    assert "paired t-test" in md and "Nadeau" in md
    rows = list(csv.DictReader((tmp_path / "table1.csv").open()))
    assert len(rows) == 2 * 3                                  # 2 networks x 3 conditions


def test_table_numbers_equal_independent_computation():
    t = build_tables(load_cells(FIXTURE))
    row = next(r for r in t["table1"] if r["network"] == "resnet34" and r["adjective"] == "dark")
    v = _acc("resnet34", "dark_100")
    assert (row["mean"], row["std"]) == pytest.approx((np.mean(v), np.std(v, ddof=1)))
    for net in ("resnet34", "squeezenet1.1"):
        means = {c: np.mean(_acc(net, c)) for c in ("colorful_50", "dark_100")}
        best = max(means, key=means.get)
        real, best_row = [r for r in t["table2"] if r["network"] == net]
        assert real["condition"] == "real only" and best_row["condition"] == best
        a, b = _acc(net, best), _acc(net, "real")
        assert best_row["p_paired_accuracy"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
        d = np.subtract(a, b)
        t_nb = d.mean() / math.sqrt((1 / 3 + 120 / 545) * d.var(ddof=1))
        assert best_row["p_corrected_accuracy"] == pytest.approx(2 * sps.t.sf(abs(t_nb), 2), rel=1e-9)
        p = {c: sps.ttest_rel(_acc(net, c), b).pvalue for c in ("colorful_50", "dark_100")}
        low, high = sorted(p.values())                    # Holm, m = 2 conditions
        holm_adj = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}
        assert best_row["p_paired_holm"] == pytest.approx(holm_adj[p[best]])
        assert best_row["holm_family"] == 2
        assert "Nadeau" in best_row["test_corrected"] and "paired" in best_row["test_paired"]
        b_row = [r for r in t["table3"] if r["network"] == net][1]
        ab, bb = _acc(net, best, "dataset_b"), _acc(net, "real", "dataset_b")
        assert b_row["accuracy"] == pytest.approx(np.mean(ab))
        assert b_row["p_paired_accuracy"] == pytest.approx(sps.ttest_rel(ab, bb).pvalue, rel=1e-9)
    fig = next(r for r in t["fig1a"] if r["network"] == "squeezenet1.1" and r["synthetic_set"] == "dark")
    assert fig["mean"] == pytest.approx(np.mean(_acc("squeezenet1.1", "real", "synthetic/dark")))


def test_tables_bad_input(tmp_path):
    with pytest.raises(MeddapError, match="no cells/ folder"):
        load_cells(tmp_path)
    (tmp_path / "cells" / "resnet34" / "real").mkdir(parents=True)
    (tmp_path / "cells" / "resnet34" / "real" / "fold0.json").write_text("{broken")
    with pytest.raises(MeddapError, match="not valid JSON"):
        load_cells(tmp_path)
    with pytest.raises(MeddapError, match="--metric 'auc'"):
        build_tables(load_cells(FIXTURE), metric="auc")


def test_tables_without_cells_is_a_sentence(tmp_path, capsys):
    assert main(["tables", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == (
        f"meddap tables: error: results folder {tmp_path} has no cells/ folder; expected "
        f"cells/<network>/<condition>/fold<k>_seed<s>.json files.\n")
    (tmp_path / "cells").mkdir()                       # e.g. a run with no networks
    assert main(["tables", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == (
        f"meddap tables: error: results folder {tmp_path} holds no complete cells; expected "
        f"cells/<network>/<condition>/fold<k>_seed<s>.json files written by `meddap run` (a run with "
        f"no networks has none).\n")
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- seeds, classic, calibration

# sha256 of what `meddap tables` wrote for the fixture before seeds, the classic arm and
# calibration existed: single-seed cells without the new fields give the same files.
TODAY = {
    "table1.csv": "afc46df604a2752c223caf3803ea5707e53cfeb918e07bbd011244ab7bda5073",
    "table2.csv": "a14fcc7351b44d321f0de120347e96ec96905b07fbb30883d10acf2173b12bc3",
    "table3.csv": "e7d3763c70dd2b37e6191493452f9ff80c3006944c16cfcd80469bfc5453bc7c",
    "fig1a.csv": "b8f528bf7ac9ddb3a7d9a8dfc1a59d963eab3a76b11aa9a991414b04d74f2567",
    "tables.md": "3ffd3194a2c125179eaca80dc1dc20a5c516e759ab968dca313289f45bbeebc0",
}


def test_single_seed_fixture_gives_todays_tables(tmp_path):
    import hashlib
    assert main(["tables", str(FIXTURE), "--out", str(tmp_path)]) == 0
    for name, digest in TODAY.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name
    assert not list(tmp_path.glob("reliability_*.png"))       # the fixture has no calibration


N_TEST = 10


def _cell(cond, fold, seed, acc, correct=None, ece=None):
    adjective, augment = {"real": (None, "none"), "classic": (None, "classic"),
                          "dark_100": ("dark", "none"), "classic+dark_100": ("dark", "classic")}[cond]
    ev = {"accuracy": acc, "sensitivity": acc, "specificity": acc, "precision": acc, "f1": acc,
          "n": N_TEST}
    if correct is not None:
        ev["correct"] = correct
    if ece is not None:
        ev.update(ece=ece, brier=2 * ece,
                  reliability={"count": [0] * 14 + [N_TEST], "correct": [0.0] * 14 + [acc * N_TEST],
                               "confidence": [0.0] * 14 + [N_TEST * 1.0]})
    return {"format": "meddap-classify-cell/1", "complete": True, "network": "resnet34",
            "adjective": adjective, "ratio": 0.0 if adjective is None else 1.0, "augment": augment,
            "condition": cond, "fold": fold, "seed": seed, "imagenet_init": False,
            "n_train_real": 40, "evaluations": {"dataset_a": ev}}


def _write(root, cells):
    for c in cells:
        p = root / "cells" / c["network"] / c["condition"] / f"fold{c['fold']}_seed{c['seed']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(c))
    return root


def _acc_table():
    """accuracy[cond][(fold, seed)]: 3 folds x 2 seeds; dark_100 lacks (fold 2, seed 1)."""
    base = {"real": 0.60, "classic": 0.64, "dark_100": 0.70, "classic+dark_100": 0.66}
    acc = {c: {(f, s): round(b + 0.05 * f * (f - 1) * (1 if c == "real" else -1) + 0.02 * s
                             + 0.01 * (f + s) * (c == "dark_100"), 4)
               for f in range(3) for s in range(2)} for c, b in base.items()}
    del acc["dark_100"][(2, 1)]
    return acc


def test_pairing_by_fold_and_seed_and_fold_averaging():
    acc = _acc_table()
    cells = [_cell(c, f, s, v) for c, runs in acc.items() for (f, s), v in runs.items()]
    t = build_tables(cells)
    row1 = next(r for r in t["table1"] if r["adjective"] == "dark")
    v = list(acc["dark_100"].values())
    assert (row1["n_folds"], row1["n_seeds"]) == (3, 2)
    assert (row1["mean"], row1["std"]) == pytest.approx((np.mean(v), np.std(v, ddof=1)))
    assert [r["adjective"] for r in t["table1"]] == ["real only", "classic", "dark", "classic+dark"]
    real, classic, best = t["table2"]
    assert (real["condition"], classic["condition"], best["condition"]) == ("real only", "classic", "dark_100")
    for suffix, base in (("", "real"), ("_vs_classic", "classic")):
        runs = sorted(acc["dark_100"])                           # 5 pairs: (2, 1) is missing
        a, b = [acc["dark_100"][r] for r in runs], [acc[base][r] for r in runs]
        assert best[f"p_paired_accuracy{suffix}"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
        # folds: mean over the seeds both have; fold 2 keeps seed 0 only
        fa = [np.mean([acc["dark_100"][(f, s)] for s in (0, 1) if (f, s) in acc["dark_100"]]) for f in range(3)]
        fb = [np.mean([acc[base][(f, s)] for s in (0, 1) if (f, s) in acc["dark_100"]]) for f in range(3)]
        assert fb[2] == acc[base][(2, 0)]
        d = np.subtract(fa, fb)
        t_nb = d.mean() / math.sqrt((1 / 3 + N_TEST / 40) * d.var(ddof=1))
        p_nb = 2 * sps.t.sf(abs(t_nb), 2)
        assert best[f"p_corrected_accuracy{suffix}"] == pytest.approx(p_nb, rel=1e-9)
        other = sorted(acc["classic+dark_100"])
        p_other = sps.ttest_rel([acc["classic+dark_100"][r] for r in other],
                                [acc[base][r] for r in other]).pvalue
        p_best = sps.ttest_rel(a, b).pvalue                     # Holm, m = 2, within each baseline
        holm_best = min(1, 2 * p_best) if p_best <= p_other else max(min(1, 2 * p_other), p_best)
        assert best[f"p_paired_holm{suffix}"] == pytest.approx(holm_best, rel=1e-9)
    assert best["holm_family"] == 2 and "diff_vs_real" not in best   # no per-image correctness
    assert "ece" not in best


def test_fold_average_closed_case():
    """Two seeds whose differences cancel within each fold: the corrected test sees d = 0
    on every fold (t = p = nan), the paired test sees +-0.1 (mean 0, p = 1)."""
    cells = []
    for f in range(3):
        for s, d in ((0, 0.1), (1, -0.1)):
            cells += [_cell("real", f, s, 0.5 + 0.1 * f), _cell("dark_100", f, s, 0.5 + 0.1 * f + d)]
    best = build_tables(cells)["table2"][1]
    assert best["p_paired_accuracy"] == pytest.approx(1.0)
    assert math.isnan(best["p_corrected_accuracy"])


def test_difference_interval_contains_the_true_difference(tmp_path):
    """3 folds x 2 seeds, 400 test images per fold. Real only is right on an image with
    probability 0.6; dark with 0.8, and each seed flips 5% of its images, so dark's
    accuracy is 0.8 · 0.95 + 0.2 · 0.05 = 0.77 and the true difference 0.17. The seeds
    are averaged per image before the images of the folds are pooled."""
    rng = np.random.default_rng(0)
    n = 400
    cells = []
    truth_a, truth_b = [], []
    for f in range(3):
        pa, pb = rng.random(n) < 0.8, rng.random(n) < 0.6   # per-image "true" correctness
        for s in range(2):
            flip = rng.random(n) < 0.05                    # seeds disagree on a few images
            ca, cb = (pa ^ flip).astype(int), pb.astype(int)
            ca_l, cb_l = ca.tolist(), cb.tolist()
            cells += [_cell("dark_100", f, s, ca.mean(), ca_l, ece=0.1),
                      _cell("real", f, s, cb.mean(), cb_l, ece=0.2)]
            for c in cells[-2:]:
                c["evaluations"]["dataset_a"]["n"] = n
        truth_a.append(np.mean([c["evaluations"]["dataset_a"]["correct"] for c in cells[-4::2]], axis=0))
        truth_b.append(np.mean([c["evaluations"]["dataset_a"]["correct"] for c in cells[-3::2]], axis=0))
    t = build_tables(cells)
    row = next(r for r in t["table1"] if r["adjective"] == "dark")
    d = np.concatenate(truth_a) - np.concatenate(truth_b)
    assert row["diff_vs_real"] == pytest.approx(d.mean())
    assert row["diff_ci95_low"] < 0.17 < row["diff_ci95_high"]          # the true difference
    assert row["diff_ci95_low"] < d.mean() < row["diff_ci95_high"]
    se = d.std() / math.sqrt(d.size)                                   # normal approximation
    assert row["diff_ci95_high"] - row["diff_ci95_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    best = t["table2"][1]
    assert best["ece"] == pytest.approx(0.1) and best["brier"] == pytest.approx(0.2)
    assert best["diff_vs_real"] == row["diff_vs_real"]
    assert main(["tables", str(_write(tmp_path / "res", cells)), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "reliability_resnet34.png").is_file()
    header = next(csv.reader((tmp_path / "t" / "table2.csv").open()))
    assert {"ece", "ece_std", "brier", "brier_std", "diff_vs_real", "diff_ci95_low"} <= set(header)
    md = (tmp_path / "t" / "tables.md").read_text()
    assert "ECE %" in md and "folds × seeds" in md


def test_old_and_new_names_of_one_cell_are_refused(tmp_path):
    cell = _cell("real", 0, 0, 0.5)
    _write(tmp_path, [cell])
    (tmp_path / "cells" / "resnet34" / "real" / "fold0.json").write_text(json.dumps(cell))
    with pytest.raises(MeddapError, match=r"are both resnet34 real fold 0 seed 0; delete one"):
        load_cells(tmp_path)
    old = {k: v for k, v in cell.items() if k not in ("seed", "augment")}
    (tmp_path / "cells" / "resnet34" / "real" / "fold0.json").write_text(json.dumps(old))
    (tmp_path / "cells" / "resnet34" / "real" / "fold0_seed0.json").unlink()
    assert load_cells(tmp_path) == [cell]                    # read as augment none, seed 0


def test_one_run_per_condition_prints_no_spread(tmp_path):
    """One fold and one seed: no std exists, and the tables show the values alone (no '± nan')."""
    cells = [_cell("real", 0, 0, 0.8, [1, 1, 1, 1, 0], ece=0.2), _cell("dark_100", 0, 0, 0.6, [1, 1, 1, 0, 0], ece=0.1)]
    assert main(["tables", str(_write(tmp_path / "res", cells)), "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "tables.md").read_text()
    assert "nan" not in md and "0.4000 |" in md and "0.2000 |" in md       # Brier = 2 ECE in _cell
