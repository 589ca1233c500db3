"""The paper's tables from result cells (MEDDAP Tables 1-3, Fig. 1a); the cells
and their folder layout are in cells.py.

Tables (`meddap tables RESULTS --out DIR`): mean ± sample std over every run
(fold × seed) of a condition. The conditions are real only, classic (real
images with classic augmentation, when present), and the synthetic ones
(<adjective>_<percent>, classic+<adjective>_<percent>). The best synthetic
condition of each network is the one of highest mean `metric` on Dataset A;
it is compared with real only and, when present, with classic: the paired
t-test (as the paper) pairs the runs by (fold, seed); the Nadeau-Bengio
corrected test averages each condition over the seeds within a fold first and
then runs over the folds, the resampling unit (stats.compare_runs). Holm's
correction is applied over all synthetic conditions of the network, once for
the comparisons with real only and once for those with classic (choosing the
best of many conditions is a multiple comparison). Table 3 shows, on Dataset
B, the condition chosen on Dataset A (choosing on B itself would flatter it).
Both tables use n_test/n_train of the Dataset A split for the correction: the
folds are correlated by their shared training images.

Columns that need data older cells lack appear only when the cells have it,
so cells of one seed without calibration give the tables they gave before:
`n_seeds` (more than one seed), `ece`/`brier` (± std, calibration in the
evaluations), `diff_vs_real` with `diff_ci95_low`/`diff_ci95_high` (each
condition's accuracy minus real only's, with a 95% bootstrap interval over
the test images pooled across folds, paired by image, seeds averaged per
image; needs the cells' per-image `correct`), and the p-values versus
classic (`p_paired_<metric>_vs_classic`, ..., when classic cells exist).
Per network, `reliability_<network>.png` is the reliability diagram on
Dataset A of real only, classic and the best condition, the bins pooled over
the runs.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from meddap.classify.cells import DATASET_A, DATASET_B, SYNTHETIC, condition_name, load_cells
from meddap.classify.metrics import CALIBRATION_NAMES, METRIC_NAMES, ece_from_bins
from meddap.classify.networks import Arch
from meddap.classify.stats import compare_runs, holm, mean_std, paired_bootstrap_difference
from meddap.classify.train import Augment
from meddap.data.prompts import ADJECTIVES
from meddap.errors import MeddapError
from meddap.figures import bar_chart, reliability_diagram
from meddap.io import write_text_atomic

Condition = tuple      # (adjective or None, ratio, augment value)
REAL_ONLY: Condition = (None, 0.0, Augment.NONE.value)
CLASSIC: Condition = (None, 0.0, Augment.CLASSIC.value)
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


# ---------------------------------------------------------------- aggregation

def _key(cell: dict) -> Condition:
    return (cell["adjective"], cell["ratio"], cell["augment"])


def _name(cond: Condition) -> str:
    return condition_name(cond[0], cond[1], Augment(cond[2]))


def _label(cond: Condition) -> str:
    """Row label: 'real only', 'classic', the adjective or 'classic+<adjective>'."""
    if cond == REAL_ONLY:
        return "real only"
    return _name(cond) if cond[0] is None else _name(cond).rsplit("_", 1)[0]


def _order(cells: list[dict]) -> tuple[list[str], list[Condition]]:
    """Networks in Arch order; conditions real only, classic, then Table 1's
    adjective order, ratio, plain before classic+."""
    nets = [a.value for a in Arch if any(c["network"] == a.value for c in cells)]
    adj_rank = {a: i for i, a in enumerate(ADJECTIVES)}
    conds = sorted({_key(c) for c in cells},
                   key=lambda k: (k[0] is not None, adj_rank.get(k[0], len(adj_rank)),
                                  k[0] or "", k[1], k[2] != Augment.NONE.value))
    return nets, conds


def _runs(cells, network, cond, test) -> list[dict]:
    return [c for c in cells if c["network"] == network and _key(c) == cond and test in c["evaluations"]]


def _scores(cells, network, cond, test, metric) -> dict[tuple[int, int], float]:
    """(fold, seed) -> metric value on `test`."""
    return {(c["fold"], c["seed"]): c["evaluations"][test][metric]
            for c in _runs(cells, network, cond, test) if metric in c["evaluations"][test]}


def _per_image(cells, network, cond, test) -> dict[int, np.ndarray]:
    """fold -> (n_test,) correctness of each test image, averaged over the seeds."""
    by_fold: dict[int, list] = {}
    for c in _runs(cells, network, cond, test):
        if "correct" in c["evaluations"][test]:
            by_fold.setdefault(c["fold"], []).append(c["evaluations"][test]["correct"])
    return {f: np.mean(np.asarray(v, dtype=np.float64), axis=0) for f, v in by_fold.items()}


def _difference_to_real(cells, network, cond, test) -> dict:
    """diff_vs_real and its 95% bootstrap interval, images pooled over the folds
    both conditions have; {} without per-image correctness."""
    a, b = _per_image(cells, network, cond, test), _per_image(cells, network, REAL_ONLY, test)
    folds = sorted(set(a) & set(b))
    if not folds:
        return {}
    for f in folds:
        if a[f].shape != b[f].shape:
            raise MeddapError(f"{network} {_name(cond)} fold {f} was scored on {a[f].size} {test} "
                              f"images and real only on {b[f].size}; both must use the same test set.")
    r = paired_bootstrap_difference(np.concatenate([a[f] for f in folds]),
                                    np.concatenate([b[f] for f in folds]),
                                    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    return {"diff_vs_real": r["difference"], "diff_ci95_low": r["ci"][0], "diff_ci95_high": r["ci"][1]}


def _fmt(mean: float, std: float) -> str:
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std != std else f" ± {100 * std:.2f}")


def _fmt_brier(mean: float, std: float) -> str:
    """As `_fmt`, unscaled: the Brier score is not a percentage (one run: no ± part)."""
    return f"{mean:.4f}" + ("" if std != std else f" ± {std:.4f}")


def _fmt_p(p: float) -> str:
    return "n/a" if p != p else f"{p:.4g}"


def _mean_std(cells, network, cond, test, metric) -> tuple[float, float]:
    return mean_std(list(_scores(cells, network, cond, test, metric).values()))


def build_tables(cells: list[dict], metric: str = "accuracy") -> dict[str, list[dict]]:
    """Rows of Table 1, Table 2, Table 3 and Fig. 1a (values as fractions)."""
    if metric not in METRIC_NAMES:
        raise MeddapError(f"--metric {metric!r} is not one of {', '.join(METRIC_NAMES)}.")
    nets, conds = _order(cells)
    multi_seed = len({c["seed"] for c in cells}) > 1
    table1 = []
    for cond in conds:
        for net in nets:
            v = _scores(cells, net, cond, DATASET_A, "accuracy")
            if v:
                m, s = mean_std(list(v.values()))
                row = {"adjective": _label(cond), "ratio": cond[1], "network": net,
                       "n_folds": len({f for f, _ in v}), "mean": m, "std": s}
                if multi_seed:
                    row["n_seeds"] = len({s for _, s in v})
                if cond != REAL_ONLY:
                    row.update(_difference_to_real(cells, net, cond, DATASET_A))
                table1.append(row)
    table2, table3 = [], []
    for net in nets:
        real_cells = _runs(cells, net, REAL_ONLY, DATASET_A)
        if not real_cells:
            continue
        n_train = sum(c["n_train_real"] for c in real_cells) / len(real_cells)
        n_test = sum(c["evaluations"][DATASET_A]["n"] for c in real_cells) / len(real_cells)
        synth = [k for k in conds if k[0] is not None and _scores(cells, net, k, DATASET_A, metric)]
        if not synth:
            continue
        best = max(synth, key=lambda k: _mean_std(cells, net, k, DATASET_A, metric)[0])
        baselines = {"": REAL_ONLY}
        if _scores(cells, net, CLASSIC, DATASET_A, metric):
            baselines["_vs_classic"] = CLASSIC
        holm_p = {}
        for suffix, base in baselines.items():
            family = [compare_runs(_scores(cells, net, k, DATASET_A, metric),
                                   _scores(cells, net, base, DATASET_A, metric), n_train, n_test)
                      for k in synth]
            for kind in ("paired", "corrected"):
                holm_p[kind + suffix] = holm([f[kind].pvalue for f in family])[synth.index(best)]
        for table, test in ((table2, DATASET_A), (table3, DATASET_B)):
            for cond in [REAL_ONLY] + [base for base in baselines.values() if base != REAL_ONLY] + [best]:
                row = {"network": net, "condition": _label(cond) if cond[0] is None else _name(cond)}
                for m in METRIC_NAMES + CALIBRATION_NAMES:
                    if m in METRIC_NAMES or _scores(cells, net, cond, test, m):
                        row[m], row[m + "_std"] = _mean_std(cells, net, cond, test, m)
                if cond != REAL_ONLY:
                    row.update(_difference_to_real(cells, net, cond, test))
                if cond is best:
                    for suffix, base in baselines.items():
                        for m in METRIC_NAMES:
                            tests = compare_runs(_scores(cells, net, best, test, m),
                                                 _scores(cells, net, base, test, m), n_train, n_test)
                            for kind, r in tests.items():
                                row[f"p_{kind}_{m}{suffix}"] = r.pvalue
                                row[f"test_{kind}"] = r.test
                        if test == DATASET_A:
                            row[f"p_paired_holm{suffix}"] = holm_p["paired" + suffix]
                            row[f"p_corrected_holm{suffix}"] = holm_p["corrected" + suffix]
                            row["holm_family"] = len(synth)
                if not (test == DATASET_B and row["accuracy"] != row["accuracy"]):
                    table.append(row)
    fig1a = []
    for net in nets:
        real = [c for c in cells if c["network"] == net and _key(c) == REAL_ONLY]
        names = sorted({k for c in real for k in c["evaluations"] if k.startswith(SYNTHETIC)},
                       key=lambda k: ADJECTIVES.index(k[len(SYNTHETIC):])
                       if k[len(SYNTHETIC):] in ADJECTIVES else len(ADJECTIVES))
        for name in names:
            m, s = mean_std([c["evaluations"][name]["accuracy"] for c in real if name in c["evaluations"]])
            fig1a.append({"network": net, "synthetic_set": name[len(SYNTHETIC):], "mean": m, "std": s})
    return {"table1": table1, "table2": table2, "table3": table3, "fig1a": fig1a}


def reliability(cells: list[dict], network: str, cond: Condition, test: str = DATASET_A) -> dict | None:
    """The reliability bins (metrics.reliability_bins) of a condition summed over
    its runs, or None when its cells carry none."""
    bins = [c["evaluations"][test]["reliability"] for c in _runs(cells, network, cond, test)
            if "reliability" in c["evaluations"][test]]
    if not bins:
        return None
    return {k: np.sum([b[k] for b in bins], axis=0).tolist() for k in ("count", "correct", "confidence")}


# ---------------------------------------------------------------- writing

def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _md(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def _metrics_md(rows: list[dict], title: str, metric: str) -> str:
    calibrated = any("ece" in r for r in rows)
    vs_classic = any("p_paired_holm_vs_classic" in r or f"p_paired_{metric}_vs_classic" in r for r in rows)
    header = ["network", "condition"] + [f"{m} %" for m in METRIC_NAMES] + (
        ["ECE %", "Brier"] if calibrated else []) + [
        "p (paired t)", "p (Nadeau-Bengio)", "Holm p (paired / N-B)"] + (
        ["vs classic: p (paired t / N-B)", "vs classic: Holm p"] if vs_classic else [])
    body = []
    for r in rows:
        holm_txt = (f"{_fmt_p(r['p_paired_holm'])} / {_fmt_p(r['p_corrected_holm'])} "
                    f"(m={r['holm_family']})" if "p_paired_holm" in r else "")
        line = [r["network"], r["condition"]] + [_fmt(r[m], r[m + "_std"]) for m in METRIC_NAMES]
        if calibrated:
            line += [_fmt(r["ece"], r["ece_std"]) if "ece" in r else "",
                     _fmt_brier(r["brier"], r["brier_std"]) if "brier" in r else ""]
        line += [_fmt_p(r[f"p_paired_{metric}"]) if "test_paired" in r else "",
                 _fmt_p(r[f"p_corrected_{metric}"]) if "test_corrected" in r else "",
                 holm_txt]
        if vs_classic:
            key = f"p_paired_{metric}_vs_classic"
            line += [f"{_fmt_p(r[key])} / {_fmt_p(r[f'p_corrected_{metric}_vs_classic'])}"
                     if key in r else "",
                     f"{_fmt_p(r['p_paired_holm_vs_classic'])} / "
                     f"{_fmt_p(r['p_corrected_holm_vs_classic'])}" if "p_paired_holm_vs_classic" in r
                     else ""]
        body.append(line)
    note = (f"\np-values compare the {metric} of the best condition with real only, fold by fold: "
            "paired t-test (Student, as MEDDAP) and corrected resampled t-test (Nadeau & Bengio "
            "2003); Holm over all conditions of the network. Per-metric p-values are in the CSV.\n")
    if vs_classic:
        note += ("The same tests against classic augmentation (real images, flip, rotation, "
                 "crop, brightness/contrast) are in the vs classic columns, Holm within them.\n")
    return f"## {title}\n\n" + _md(header, body) + note


def write_tables(results: str | Path, out: str | Path, metric: str = "accuracy") -> list[Path]:
    """Write table1/2/3 and fig1a as CSV, one Markdown file and PNG charts."""
    cells = load_cells(results)
    t = build_tables(cells, metric)
    out = Path(out)
    written = []
    for name, rows in t.items():
        if rows:
            write_text_atomic(out / f"{name}.csv", _csv(rows))
            written.append(out / f"{name}.csv")
    init = {c["imagenet_init"] for c in cells}
    init_txt = ("ImageNet" if init == {True} else "random (no ImageNet weights found)"
                if init == {False} else "MIXED ImageNet and random") + " initialisation"
    nets, conds = _order(cells)
    runs = ("folds × seeds (the Nadeau-Bengio test averages the seeds within each fold first)"
            if len({c["seed"] for c in cells}) > 1 else "folds")
    md = [f"# MEDDAP classifier results\n\n{len(cells)} cells, {init_txt}; values are "
          f"mean ± sample std across {runs}, in %. Best condition chosen by mean {metric} "
          f"on Dataset A.\n"]
    header = ["adjective", "ratio"] + nets
    body = []
    for cond in conds:
        cell = {r["network"]: _fmt(r["mean"], r["std"]) for r in t["table1"]
                if r["adjective"] == _label(cond) and r["ratio"] == cond[1]}
        body.append([_label(cond), "—" if cond[0] is None else f"+{round(cond[1] * 100)}%"]
                    + [cell.get(n, "") for n in nets])
    md.append("## Table 1: Dataset A accuracy by adjective × ratio × network\n\n" + _md(header, body))
    md.append(_metrics_md(t["table2"], "Table 2: best condition vs real only (Dataset A)", metric))
    if t["table3"]:
        md.append(_metrics_md(t["table3"], "Table 3: unseen Dataset B (condition chosen on Dataset A)",
                              metric))
    if t["fig1a"]:
        sets = list(dict.fromkeys(r["synthetic_set"] for r in t["fig1a"]))
        md.append("## Fig. 1a: real-only networks scored on each synthetic set (accuracy %)\n\n" + _md(
            ["network"] + sets,
            [[n] + [next((_fmt(r["mean"], r["std"]) for r in t["fig1a"] if r["network"] == n
                          and r["synthetic_set"] == s), "") for s in sets] for n in nets]))
    write_text_atomic(out / "tables.md", "\n".join(md))
    written.append(out / "tables.md")
    baselines = ("real only", _label(CLASSIC))
    best_or_real = lambda r: r["condition"] if r["condition"] in baselines else "best"  # noqa: E731
    charts = {
        "table1.png": ("Table 1: Dataset A accuracy (%)", t["table1"],
                       lambda r: r["adjective"] if r["adjective"] in baselines
                       else f"{r['adjective']} +{round(r['ratio'] * 100)}%", lambda r: r["network"]),
        "fig1a.png": ("Fig. 1a: real-only networks on synthetic sets, accuracy (%)", t["fig1a"],
                      lambda r: r["synthetic_set"], lambda r: r["network"]),
        "table2.png": ("Table 2: Dataset A accuracy (%), real only vs best", t["table2"],
                       lambda r: r["network"], best_or_real),
        "table3.png": ("Table 3: Dataset B accuracy (%), real only vs best on A", t["table3"],
                       lambda r: r["network"], best_or_real),
    }
    for file, (title, rows, group_of, series_of) in charts.items():
        if rows:
            values = {(group_of(r), series_of(r)): (r.get("mean", r.get("accuracy")),
                                                     r.get("std", r.get("accuracy_std")))
                      for r in rows}
            bar_chart(out / file, title, list(dict.fromkeys(g for g, _ in values)),
                      list(dict.fromkeys(s for _, s in values)), values)
            written.append(out / file)
    for net in nets:
        best = next((r["condition"] for r in t["table2"] if r["network"] == net
                     and r["condition"] not in baselines), None)
        curves = {}
        for cond in conds:
            label = _label(cond) if cond[0] is None else _name(cond)
            if cond[0] is None or label == best:
                bins = reliability(cells, net, cond)
                if bins is not None:
                    curves[f"{label} (ECE {100 * ece_from_bins(bins):.2f}%)"] = bins
        if curves:
            file = out / f"reliability_{net}.png"
            reliability_diagram(file, f"{net}: reliability on Dataset A, runs pooled", curves)
            written.append(file)
    return written
