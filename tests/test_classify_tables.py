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
        f"cells/<network>/<condition>/fold<k>.json files.\n")
    (tmp_path / "cells").mkdir()                       # e.g. a run with no networks
    assert main(["tables", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == (
        f"meddap tables: error: results folder {tmp_path} holds no complete cells; expected "
        f"cells/<network>/<condition>/fold<k>.json files written by `meddap run` (a run with "
        f"no networks has none).\n")
    assert not (tmp_path / "t").exists()
