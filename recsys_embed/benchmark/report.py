"""The sweep report, built only from the results store: markdown tables, a Pareto plot per dataset x model.

For every dataset x model of the store and every setting group under it (rows that differ only in method, budget
and seed, :func:`~recsys_embed.benchmark.sections.setting_groups`: an edited spec or a second ``data_dir`` under
one name gives a second, labelled section), ``report.md`` states the data, model, training and the seeds pooled,
and holds:

* test AUC and test log loss, method x budget, ``mean ± std`` over seeds (sample std), the best mean of each budget
  in bold; cells a method cannot reach read ``infeasible``, errors ``failed``;
* the compression ratio each method really reached and its memory;
* train-step and inference time relative to ``full`` (medians over steps and seeds);
* a Pareto plot (``pareto_<dataset>_<model>[_<group>].png``): test AUC against memory (log x), one line per
  method, ``full`` as the reference point, the Pareto frontier in grey;
* the reasons of infeasible and failed cells.

Its header states the seeds, budgets, versions and machine, all read from the rows.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recsys_embed.benchmark.sections import header, section_facts, setting_groups, values_of
from recsys_embed.benchmark.store import CELLS_DIR, MERGED_FILE, load_results, write_merged
from recsys_embed.methods import available_methods, method_class

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
#: the metrics of the tables: column, title, whether higher is better
METRICS = (("test_auc", "Test AUC", True), ("test_logloss", "Test log loss", False))
REFERENCE_METHOD = "full"


def budget_label(ratio: float) -> str:
    return f"{ratio:g}x"


def method_order(labels: Iterable[str]) -> list[str]:
    """``full`` first, then the rest alphabetically."""
    return sorted(set(labels), key=lambda label: (label != REFERENCE_METHOD, label))


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna().astype(float)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    return mean, std, n


def aggregate(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per method label x budget: mean, std (ddof 1) and count of ``metric`` over ``ok`` seeds; status counts."""
    rows = []
    for (label, budget), group in frame.groupby(["method_label", "budget_ratio"], sort=False):
        ok = group[group["status"] == "ok"]
        mean, std, n = _mean_std(ok[metric])
        rows.append(
            {
                "method_label": label,
                "budget_ratio": float(budget),
                "mean": mean,
                "std": std,
                "n": n,
                "cells": len(group),
                "infeasible": int((group["status"] == "infeasible").sum()),
                "failed": int((group["status"] == "failed").sum()),
                "memory_bytes": float(ok["memory_bytes"].mean()) if n else math.nan,
                "ratio": float(ok["ratio"].mean()) if n else math.nan,
            }
        )
    return pd.DataFrame(rows)


def metric_table(frame: pd.DataFrame, metric: str, higher_is_better: bool, digits: int = 4) -> pd.DataFrame:
    """Method x budget strings ``mean ± std``; the best mean per budget in bold (``**...**``).

    ``frame`` holds the rows of one dataset x model. A cell with no ``ok`` seed reads ``infeasible`` or ``failed``;
    one with fewer ``ok`` seeds than cells shows ``(ok/cells)``.
    """
    stats = aggregate(frame, metric)
    budgets = sorted(stats["budget_ratio"].unique())
    methods = method_order(stats["method_label"])
    table = pd.DataFrame("", index=methods, columns=[budget_label(b) for b in budgets])
    table.index.name = "method"
    for budget in budgets:
        column = stats[stats["budget_ratio"] == budget]
        means = column["mean"].dropna()
        best = (means.max() if higher_is_better else means.min()) if len(means) else math.nan
        for _, cell in column.iterrows():
            if cell["n"] == 0:
                text = "failed" if cell["failed"] else "infeasible"
            else:
                text = f"{cell['mean']:.{digits}f}"
                if cell["n"] > 1:
                    text += f" ± {cell['std']:.{digits}f}"
                if cell["mean"] == best:
                    text = f"**{text}**"
                if cell["n"] < cell["cells"]:
                    text += f" ({cell['n']}/{cell['cells']})"
            table.loc[cell["method_label"], budget_label(budget)] = text
    return table


def ratio_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Method x budget: the ratio really reached and the memory it stores (mean over ``ok`` seeds)."""
    stats = aggregate(frame, "ratio")
    budgets = sorted(stats["budget_ratio"].unique())
    table = pd.DataFrame("", index=method_order(stats["method_label"]), columns=[budget_label(b) for b in budgets])
    table.index.name = "method"
    for _, cell in stats.iterrows():
        text = "—" if cell["n"] == 0 else f"{cell['ratio']:.1f}x, {_bytes(cell['memory_bytes'])}"
        table.loc[cell["method_label"], budget_label(cell["budget_ratio"])] = text
    return table


def speed_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Method x budget: ``train step / full's`` and ``inference / full's`` (medians over ok cells); a caption."""
    ok = frame[frame["status"] == "ok"]
    reference = ok[ok["method"] == REFERENCE_METHOD]
    ref_train = float(reference["train_step_ms"].median()) if len(reference) else math.nan
    ref_infer = float(reference["inference_ms"].median()) if len(reference) else math.nan
    budgets = sorted(frame["budget_ratio"].unique())
    table = pd.DataFrame("", index=method_order(frame["method_label"]), columns=[budget_label(b) for b in budgets])
    table.index.name = "method"
    relative = not math.isnan(ref_train)
    for (label, budget), group in ok.groupby(["method_label", "budget_ratio"]):
        train, infer = float(group["train_step_ms"].median()), float(group["inference_ms"].median())
        if relative:
            text = f"{train / ref_train:.2f}x / {infer / ref_infer:.2f}x"
        else:
            text = f"{train:.1f} / {infer:.1f} ms"
        table.loc[label, budget_label(budget)] = text
    for label, budget in frame.loc[frame["status"] != "ok", ["method_label", "budget_ratio"]].itertuples(index=False):
        if not table.loc[label, budget_label(budget)]:
            table.loc[label, budget_label(budget)] = "—"
    if relative:
        caption = (
            f"train step / inference batch time relative to `full` (`full`: {ref_train:.1f} ms per train step of "
            f"{values_of(frame, 'batch_size')} rows, {ref_infer:.1f} ms per test batch of "
            f"{values_of(frame, 'eval_batch_size')} rows; medians over steps and seeds; a train step is forward + "
            "backward + fused row update + dense step)"
        )
    else:
        caption = "train step / inference batch time in ms (no `full` cell to compare with)"
    return table, caption


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table (the first column is the index)."""
    head = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(table.columns) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def _bytes(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with less or equal memory and a higher metric (x ascending)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto_plot(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Test AUC against memory (log x), one line per method, ``full`` as the reference point."""
    stats = aggregate(frame, "test_auc")
    stats = stats[stats["n"] > 0]
    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for label in method_order(stats["method_label"]):
        points = stats[stats["method_label"] == label].sort_values("memory_bytes")
        yerr = points["std"].fillna(0.0)
        if label == REFERENCE_METHOD:
            axes.errorbar(points["memory_bytes"], points["mean"], yerr=yerr, fmt="*", ms=14, color="black", label=label)
            axes.axhline(float(points["mean"].max()), color="black", ls=":", lw=1)
        else:
            axes.errorbar(points["memory_bytes"], points["mean"], yerr=yerr, marker="o", capsize=3, label=label)
    front = pareto_front(list(zip(stats["memory_bytes"], stats["mean"])))
    if front:
        xs, ys = zip(*front)
        axes.step(xs, ys, where="post", color="grey", lw=6, alpha=0.25, zorder=0, label="Pareto frontier")
    axes.set_xscale("log")
    axes.set_xlabel("embedding memory (bytes, log scale)")
    axes.set_ylabel("test AUC (mean ± std over seeds)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _best_per_budget(frame: pd.DataFrame) -> str:
    """The best mean test AUC per budget, and in how many seeds that method is also the best of its seed."""
    stats = aggregate(frame, "test_auc")
    stats = stats[stats["n"] > 0]
    ok = frame[(frame["status"] == "ok") & frame["test_auc"].notna()]
    parts = []
    for budget in sorted(stats["budget_ratio"].unique()):
        column = stats[stats["budget_ratio"] == budget]
        best = column.loc[column["mean"].idxmax()]
        cells = ok[ok["budget_ratio"] == budget]
        winners = cells.loc[cells.groupby("seed")["test_auc"].idxmax(), "method_label"]
        agree = int((winners == best["method_label"]).sum())
        parts.append(
            f"{budget_label(budget)}: `{best['method_label']}` ({best['mean']:.4f}, best in {agree}/{len(winners)} "
            "seeds)"
        )
    return "Best test AUC per budget: " + "; ".join(parts) + "." if parts else "No finished cell yet."


def _problems(frame: pd.DataFrame) -> list[str]:
    bad = frame[frame["status"] != "ok"]
    if bad.empty:
        return []
    lines = ["", "### Infeasible and failed cells", ""]
    seen = set()
    for _, row in bad.sort_values(["status", "method_label", "budget_ratio"]).iterrows():
        reason = str(row["reason"] or "").strip().splitlines()[0] if row["reason"] else ""
        key = (row["status"], row["method_label"], row["budget_ratio"], reason)
        if key in seen:
            continue
        seen.add(key)
        count = int(
            (
                (bad["status"] == row["status"])
                & (bad["method_label"] == row["method_label"])
                & (bad["budget_ratio"] == row["budget_ratio"])
            ).sum()
        )
        lines.append(
            f"- `{row['method_label']}` at {budget_label(row['budget_ratio'])} ({row['status']}, {count} cell(s)): "
            f"{reason}"
        )
    return lines


def current_version_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the rows of registered methods measured at another class version than this code's (rows
    from before versions were recorded count as version 1); each left-out group is logged."""
    if frame.empty or "method_version" not in frame:
        return frame
    recorded = pd.to_numeric(frame["method_version"], errors="coerce").fillna(1).astype(int)
    current = frame["method"].map(lambda name: method_class(name).version if name in available_methods() else None)
    stale = current.notna() & (recorded != current)
    for (method, version), group in frame[stale].groupby([frame["method"][stale], recorded[stale]]):
        log.warning(
            "Left out %d result row(s) of method %r version %d: this code has version %d (rerun the sweep).",
            len(group),
            method,
            version,
            method_class(method).version,
        )
    return frame[~stale].reset_index(drop=True)


def build_report(output: str | Path, frame: pd.DataFrame | None = None) -> Path:
    """Merge the stores under ``output`` (or use ``frame``), write ``results.parquet``, the plots and ``report.md``.

    Rows of a method measured at another class version than this code's are left out (:func:`current_version_rows`).
    """
    output = Path(output)
    if frame is None:
        frame = load_results(output)
    if frame.empty:
        hint = f" ({MERGED_FILE} is the report's output, not read back: copy the {CELLS_DIR}/ folders too)"
        merged_only = (output / MERGED_FILE).is_file()
        raise ValueError(
            f"No results under {str(output)!r}{hint if merged_only else ''}: run `recsys-embed bench --output "
            f"{output}` first."
        )
    output.mkdir(parents=True, exist_ok=True)
    write_merged(frame, output)  # every row; the report's tables use the current versions' rows
    frame = current_version_rows(frame)
    lines = header(frame, output)
    sections = [
        (dataset, model, label, group, f"{_slug(dataset)}_{_slug(model)}" + (f"_{i + 1}" if len(groups) > 1 else ""))
        for (dataset, model), named in frame.groupby(["dataset", "model"], sort=False)
        for groups in [setting_groups(named)]
        for i, (label, group) in enumerate(groups)
    ]
    for dataset, model, label, group, slug in sections:
        title = f"{dataset} / {model}" + (f" ({label})" if label else "")
        lines += ["", f"## {title}", "", *section_facts(group), "", _best_per_budget(group)]
        for metric, title, higher in METRICS:
            better = "higher" if higher else "lower"
            lines += ["", f"### {title} ({better} is better; best per budget in bold)", ""]
            lines.append(to_markdown(metric_table(group, metric, higher)))
        lines += ["", "### Compression ratio reached and memory stored", "", to_markdown(ratio_table(group))]
        speed, caption = speed_tables(group)
        lines += ["", "### Speed", "", caption + ":", "", to_markdown(speed)]
        if (group["status"] == "ok").any():
            png = f"pareto_{slug}.png"
            seeds = group["seed"].nunique()
            pareto_plot(group, output / png, f"{dataset} / {model}: test AUC vs memory ({seeds} seed(s))")
            lines += ["", "### Pareto plot", "", f"![test AUC vs memory]({png})"]
        lines += _problems(group)
    path = output / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    log.info("Report written to %s", path)
    return path
