"""The paper's tables from result cells (MEDDAP Tables 1-3, Fig. 1a); the cells
and their folder layout are in cells.py.

Tables (`meddap tables RESULTS --out DIR`): mean ± sample std across folds.
The best condition of each network is the one of highest mean `metric` on
Dataset A; it is compared with real-only fold by fold with the paired t-test
(as the paper) and the Nadeau-Bengio corrected test (stats.py), and Holm's
correction is applied over all conditions compared with real-only for that
network (choosing the best of many conditions is a multiple comparison).
Table 3 shows, on Dataset B, the condition chosen on Dataset A (choosing on B
itself would flatter it). Both tables use n_test/n_train of the Dataset A
split for the correction: the folds are correlated by their shared training
images.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from meddap.classify.cells import DATASET_A, DATASET_B, SYNTHETIC, condition_name, load_cells
from meddap.classify.metrics import METRIC_NAMES
from meddap.classify.networks import Arch
from meddap.classify.stats import corrected_resampled_t_test, holm, mean_std, paired_t_test
from meddap.data.prompts import ADJECTIVES
from meddap.errors import MeddapError
from meddap.figures import bar_chart
from meddap.io import write_text_atomic


# ---------------------------------------------------------------- aggregation

def _order(cells: list[dict]) -> tuple[list[str], list[tuple]]:
    """Networks in Arch order; conditions real first, then Table 1's adjective order, ratio."""
    nets = [a.value for a in Arch if any(c["network"] == a.value for c in cells)]
    adj_rank = {a: i for i, a in enumerate(ADJECTIVES)}
    conds = sorted({(c["adjective"], c["ratio"]) for c in cells},
                   key=lambda ar: (ar[0] is not None, adj_rank.get(ar[0], len(adj_rank)),
                                   ar[0] or "", ar[1]))
    return nets, conds


def _scores(cells, network, adjective, ratio, test, metric) -> dict[int, float]:
    """fold -> metric value on `test`."""
    return {c["fold"]: c["evaluations"][test][metric] for c in cells
            if c["network"] == network and c["adjective"] == adjective and c["ratio"] == ratio
            and test in c["evaluations"]}


def _fmt(mean: float, std: float) -> str:
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std != std else f" ± {100 * std:.2f}")


def _fmt_p(p: float) -> str:
    return "n/a" if p != p else f"{p:.4g}"


def _compare(cells, network, best, test, metric, n_train, n_test) -> dict:
    """Paired and corrected t-tests of best vs real-only on the folds both have."""
    a = _scores(cells, network, *best, test, metric)
    b = _scores(cells, network, None, 0.0, test, metric)
    folds = sorted(set(a) & set(b))
    xa, xb = [a[f] for f in folds], [b[f] for f in folds]
    return {"paired": paired_t_test(xa, xb),
            "corrected": corrected_resampled_t_test(xa, xb, n_train, n_test)}


def build_tables(cells: list[dict], metric: str = "accuracy") -> dict[str, list[dict]]:
    """Rows of Table 1, Table 2, Table 3 and Fig. 1a (values as fractions)."""
    if metric not in METRIC_NAMES:
        raise MeddapError(f"--metric {metric!r} is not one of {', '.join(METRIC_NAMES)}.")
    nets, conds = _order(cells)
    table1 = []
    for adjective, ratio in conds:
        for net in nets:
            v = list(_scores(cells, net, adjective, ratio, DATASET_A, "accuracy").values())
            if v:
                m, s = mean_std(v)
                table1.append({"adjective": adjective or "real only", "ratio": ratio,
                               "network": net, "n_folds": len(v), "mean": m, "std": s})
    table2, table3 = [], []
    for net in nets:
        real_cells = [c for c in cells if c["network"] == net and c["adjective"] is None]
        if not real_cells:
            continue
        n_train = sum(c["n_train_real"] for c in real_cells) / len(real_cells)
        n_test = sum(c["evaluations"][DATASET_A]["n"] for c in real_cells
                     if DATASET_A in c["evaluations"]) / len(real_cells)
        synth = [ar for ar in conds if ar[0] is not None
                 and _scores(cells, net, *ar, DATASET_A, metric)]
        if not synth:
            continue
        means = {ar: mean_std(list(_scores(cells, net, *ar, DATASET_A, metric).values()))[0]
                 for ar in synth}
        best = max(synth, key=lambda ar: means[ar])
        family = [_compare(cells, net, ar, DATASET_A, metric, n_train, n_test) for ar in synth]
        holm_p = {kind: holm([f[kind].pvalue for f in family]) for kind in ("paired", "corrected")}
        i_best = synth.index(best)
        for table, test in ((table2, DATASET_A), (table3, DATASET_B)):
            for label, cond in (("real only", (None, 0.0)), (condition_name(*best), best)):
                row = {"network": net, "condition": label}
                for m in METRIC_NAMES:
                    row[m], row[m + "_std"] = mean_std(list(_scores(cells, net, *cond, test, m).values()))
                if cond is best:
                    for m in METRIC_NAMES:
                        tests = _compare(cells, net, best, test, m, n_train, n_test)
                        for kind, r in tests.items():
                            row[f"p_{kind}_{m}"] = r.pvalue
                            row[f"test_{kind}"] = r.test
                    if test == DATASET_A:
                        row["p_paired_holm"] = holm_p["paired"][i_best]
                        row["p_corrected_holm"] = holm_p["corrected"][i_best]
                        row["holm_family"] = len(synth)
                if not (test == DATASET_B and row["accuracy"] != row["accuracy"]):
                    table.append(row)
    fig1a = []
    for net in nets:
        real = [c for c in cells if c["network"] == net and c["adjective"] is None]
        names = sorted({k for c in real for k in c["evaluations"] if k.startswith(SYNTHETIC)},
                       key=lambda k: ADJECTIVES.index(k[len(SYNTHETIC):])
                       if k[len(SYNTHETIC):] in ADJECTIVES else len(ADJECTIVES))
        for name in names:
            m, s = mean_std([c["evaluations"][name]["accuracy"] for c in real if name in c["evaluations"]])
            fig1a.append({"network": net, "synthetic_set": name[len(SYNTHETIC):], "mean": m, "std": s})
    return {"table1": table1, "table2": table2, "table3": table3, "fig1a": fig1a}


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
    header = ["network", "condition"] + [f"{m} %" for m in METRIC_NAMES] + [
        "p (paired t)", "p (Nadeau-Bengio)", "Holm p (paired / N-B)"]
    body = []
    for r in rows:
        holm_txt = (f"{_fmt_p(r['p_paired_holm'])} / {_fmt_p(r['p_corrected_holm'])} "
                    f"(m={r['holm_family']})" if "p_paired_holm" in r else "")
        body.append([r["network"], r["condition"]] + [_fmt(r[m], r[m + "_std"]) for m in METRIC_NAMES]
                    + [_fmt_p(r[f"p_paired_{metric}"]) if "test_paired" in r else "",
                       _fmt_p(r[f"p_corrected_{metric}"]) if "test_corrected" in r else "",
                       holm_txt])
    note = (f"\np-values compare the {metric} of the best condition with real only, fold by fold: "
            "paired t-test (Student, as MEDDAP) and corrected resampled t-test (Nadeau & Bengio "
            "2003); Holm over all conditions of the network. Per-metric p-values are in the CSV.\n")
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
    md = [f"# MEDDAP classifier results\n\n{len(cells)} cells, {init_txt}; values are "
          f"mean ± sample std across folds, in %. Best condition chosen by mean {metric} "
          f"on Dataset A.\n"]
    header = ["adjective", "ratio"] + nets
    body = []
    for adjective, ratio in conds:
        cell = {r["network"]: _fmt(r["mean"], r["std"]) for r in t["table1"]
                if r["adjective"] == (adjective or "real only") and r["ratio"] == ratio}
        body.append([adjective or "real only", "—" if adjective is None else f"+{round(ratio * 100)}%"]
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
    best_or_real = lambda r: "real only" if r["condition"] == "real only" else "best"  # noqa: E731
    charts = {
        "table1.png": ("Table 1: Dataset A accuracy (%)", t["table1"],
                       lambda r: r["adjective"] if r["adjective"] == "real only"
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
    return written
