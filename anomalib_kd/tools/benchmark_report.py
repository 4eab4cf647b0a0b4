"""Accuracy and speed report from ``anomalib benchmark`` results and ``examples/benchmarks/speed.py``.

Reads the ``results.csv`` files that anomalib's stock ``anomalib benchmark`` writes
(``runs/benchmark/<date>/results.csv``: one row per job, with ``accelerator``, the job durations, the
flattened job config such as ``seed``, ``model.class_path``, ``model.init_args.*``, ``data.class_path``,
``data.init_args.category`` (or ``data.init_args.target``), and the test metrics such as
``image_AUROC`` and ``pixel_AUROC``) and, optionally, the speed CSV. Writes to ``--output``:

- ``report.md``: image AUROC per model and category (mean ± sample std over seeds), its mean over
  categories and the mean pixel AUROC; then the speed table; with the measurement date, machine and
  commit;
- ``auroc_per_category.png``: grouped bars of image AUROC per category and model (error bars: std);
- ``auroc_vs_latency.png``: mean image AUROC against OpenVINO latency per image, for the models present
  in both inputs (only with ``--speed``).

``--readme`` also replaces the text between ``<!-- benchmark-report:start -->`` and
``<!-- benchmark-report:end -->`` in that file with the report.

Example:
    python -m anomalib_kd.tools.benchmark_report --results runs/benchmark \\
        --speed results/speed/speed.csv --output results/benchmark --readme README.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

START_MARKER = "<!-- benchmark-report:start -->"
END_MARKER = "<!-- benchmark-report:end -->"

# Model keys of the speed CSV -> the class names anomalib's benchmark results give after shortening.
SPEED_MODEL_NAMES = {
    "rd": "ReverseDistillation",
    "efficientad": "EfficientAd",
    "patchcore": "Patchcore",
    # The suite's CPU config trains URD with a ResNet-18 expert/teacher: its speed row is the one that joins.
    "urd_r18": "URD",
    "urd": "URD (WRN50-2)",
    "dhkd": "DHKD",
    "pdd": "PDD",
    "d24fad": "D24FAD",
}
# Data init args naming the category of a job, in order of preference (FewShotTasks calls it target).
CATEGORY_COLUMNS = ("data.init_args.category", "data.init_args.target")
# anomalib's benchmark puts each run in runs/benchmark/YYYY-MM-DD-HH_MM_SS/.
RUN_FOLDER_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})-(\d{2})_(\d{2})_(\d{2})")

PER_CATEGORY_PLOT = "auroc_per_category.png"
MISSING = "-"  # table cell of a model/category pair (or a speed figure) that was not measured
LATENCY_PLOT = "auroc_vs_latency.png"


class BenchmarkReportError(ValueError):
    """Bad or missing input for the report."""


# --------------------------------------------------------------------------------------------------
# Where and when
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit(path: str | Path | None = None) -> str:
    """Short sha of the git checkout holding ``path`` (this package by default), ``-dirty`` if tracked
    files have uncommitted changes; ``"unknown"`` outside a checkout."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        # Untracked files (results/, runs/) do not count: only edits to tracked files make it dirty.
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if changes else "")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


# What the benchmark harness (examples/benchmarks) changes in a baseline's behaviour: every report marks
# the baseline (HARNESS_MARK) and says this under its table.
HARNESS_CHANGES = {
    "EfficientAd": "random PDN teacher unless a local teacher file is given; penalty images are "
    "scikit-image's sample photos, not ImageNette",
    "Patchcore": "run with MALLOC_MMAP_THRESHOLD_=1048576 (glibc allocator setting of the harness runner)",
}
HARNESS_MARK = "†"


def short_model_name(class_path: str) -> str:
    """``anomalib_kd.models.dhkd.lightning_model.DHKD``, ``anomalib.models.DHKD``, ``BudgetedDHKD``: ``DHKD``.

    ``Budgeted<Model>`` (the benchmark harness's) is the model itself with a training budget; a baseline
    the harness changes (:data:`HARNESS_CHANGES`) gets :data:`HARNESS_MARK`.
    """
    name = str(class_path).strip().rsplit(".", 1)[-1]
    short = name.removeprefix("Budgeted") or name
    return short + HARNESS_MARK if name.startswith("Budgeted") and short in HARNESS_CHANGES else short


def harness_notes(models: Iterable[str]) -> list[str]:
    """One line per harness-changed baseline among ``models`` (labels as in the tables)."""
    bases = sorted({m.split(" (")[0].removesuffix(HARNESS_MARK) for m in models if HARNESS_MARK in m})
    return [f"{HARNESS_MARK} {base}: harness change: {HARNESS_CHANGES[base]}." for base in bases]


def speed_model_name(key: str) -> str:
    """Speed-CSV model key (``rd``) -> the name used in the accuracy table (``ReverseDistillation``)."""
    return SPEED_MODEL_NAMES.get(str(key).strip().lower(), str(key).strip())


def find_result_files(paths: Sequence[str | Path]) -> list[Path]:
    """CSV files given directly, plus every ``results.csv`` under the given folders (sorted by path)."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_file():
            files.append(entry)
        elif entry.is_dir():
            files.extend(sorted(entry.rglob("results.csv")))
        else:
            msg = f"Results path {entry} does not exist."
            raise BenchmarkReportError(msg)
    if not files:
        where = ", ".join(str(Path(p).resolve()) for p in paths) or "(no paths given)"
        msg = f"No results.csv found (searched recursively under: {where}). Run `anomalib benchmark` first."
        raise BenchmarkReportError(msg)
    return files


def _run_date(file: Path) -> str:
    """When a results file was written: the date in its anomalib run folder's name (also found in a copy's
    folder name, e.g. ``dhkd_brick_seed0_2026-12-02-14_47_07``), else the file's mtime."""
    for part in reversed(file.resolve().parts):
        match = RUN_FOLDER_DATE.search(part)
        if match:
            return f"{match[1]} {match[2]}:{match[3]}"
    return datetime.fromtimestamp(file.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _read_results_csv(file: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(file)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        msg = f"{file} is not a readable CSV: {exc}"
        raise BenchmarkReportError(msg) from exc
    for column in ("model.class_path", "seed", "image_AUROC"):
        if column not in frame.columns:
            msg = (
                f"{file} has no '{column}' column, so it is not a results.csv of `anomalib benchmark` "
                f"(columns: {', '.join(map(str, frame.columns))})."
            )
            raise BenchmarkReportError(msg)
    if frame.empty:
        msg = f"{file} has no result rows."
        raise BenchmarkReportError(msg)
    frame["source"] = str(file)
    frame["run_date"] = _run_date(file)
    return frame


def _label_models(data: pd.DataFrame) -> pd.Series:
    """Short class names; a class run with different init args gets them in its label, so that two
    configurations (e.g. two backbones) are never averaged together."""
    labels = data["model.class_path"].map(short_model_name)
    arg_columns = [c for c in data.columns if c.startswith("model.init_args.")]
    for name in labels.unique():
        rows = labels == name
        varying = [c for c in arg_columns if data.loc[rows, c].astype(str).nunique() > 1]
        if varying:
            suffix = data.loc[rows, varying].apply(_describe_args, axis=1)
            labels.loc[rows] = name + " (" + suffix + ")"
    return labels


def _describe_args(row: pd.Series) -> str:
    """``backbone=resnet18, iterations=16`` from a row of ``model.init_args.*`` values."""
    # An arg a run did not set (NaN after concatenating CSVs) took the class default.
    return ", ".join(
        f"{key.removeprefix('model.init_args.')}={_number(value) if pd.notna(value) else 'default'}"
        for key, value in row.items()
    )


def _label_categories(data: pd.DataFrame) -> pd.Series:
    """The category (or few-shot target) of each job.

    Prefixed by the datamodule only when one model ran on several datamodules; otherwise a category is one
    column for all models (e.g. D24FAD's few-shot target beside the one-class runs on the same test set)
    and ``render_markdown`` names each model's datamodule.
    """
    data_names = (
        data["data.class_path"].map(short_model_name)
        if "data.class_path" in data.columns
        else pd.Series("data", index=data.index)
    )
    categories = pd.Series(pd.NA, index=data.index, dtype=object)
    for column in CATEGORY_COLUMNS:
        if column in data.columns:
            categories = categories.fillna(data[column].astype(object))
    several = bool((data_names.groupby(data["model"]).nunique() > 1).any()) if "model" in data else False
    labels = []
    for data_name, category in zip(data_names, categories, strict=True):
        if pd.isna(category):
            labels.append(str(data_name))
        else:
            labels.append(f"{data_name}/{category}" if several else str(category))
    return pd.Series(labels, index=data.index)


def load_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """All results rows of the given CSV files / folders, with ``model`` and ``category`` labels added.

    A job found twice (same model configuration, category and seed, e.g. a rerun) keeps its last
    occurrence in path order; anomalib's dated run folders sort oldest first, so the newest run wins.
    The number of rows dropped that way is in ``attrs["duplicates_dropped"]``.
    """
    frames = [_read_results_csv(file) for file in find_result_files(paths)]
    data = pd.concat(frames, ignore_index=True, sort=False)
    data["model"] = _label_models(data)
    data["category"] = _label_categories(data)
    before = len(data)
    data = data.drop_duplicates(subset=["model", "category", "seed"], keep="last").reset_index(drop=True)
    data.attrs["duplicates_dropped"] = before - len(data)
    return data


def load_speed(path: str | Path) -> pd.DataFrame:
    """The speed CSV of ``examples/benchmarks/speed.py``, with ``name`` (the accuracy table's model name)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Speed CSV {path} does not exist."
        raise BenchmarkReportError(msg)
    try:
        speed = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        msg = f"{path} is not a readable CSV: {exc}"
        raise BenchmarkReportError(msg) from exc
    if "model" not in speed.columns:
        msg = f"{path} has no 'model' column, so it is not a CSV of examples/benchmarks/speed.py."
        raise BenchmarkReportError(msg)
    speed["name"] = speed["model"].map(speed_model_name)
    return speed


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per model and category: image (and pixel, when present) AUROC mean, sample std and seed count.

    Rows keep the categories' first-appearance order; models are sorted by name.
    """
    aggregations = {
        "image_mean": ("image_AUROC", "mean"),
        "image_std": ("image_AUROC", "std"),  # sample std (ddof=1); NaN for a single seed
        "n_seeds": ("image_AUROC", "count"),
    }
    if "pixel_AUROC" in results.columns:
        aggregations |= {"pixel_mean": ("pixel_AUROC", "mean"), "pixel_std": ("pixel_AUROC", "std")}
    summary = results.groupby(["model", "category"], sort=False).agg(**aggregations).reset_index()
    category_order = {category: i for i, category in enumerate(dict.fromkeys(results["category"]))}
    summary["_order"] = summary["category"].map(category_order)
    summary = summary.sort_values(["model", "_order"], kind="stable").drop(columns="_order")
    return summary.reset_index(drop=True)


def model_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean over categories of the per-category means, and whether every category is in it."""
    n_categories = summary["category"].nunique()
    columns = {"image_mean": ("image_mean", "mean"), "n_categories": ("category", "nunique")}
    if "pixel_mean" in summary.columns:
        columns["pixel_mean"] = ("pixel_mean", "mean")
    means = summary.groupby("model", sort=True).agg(**columns)
    means["complete"] = means["n_categories"] == n_categories
    return means


def latency_points(summary: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Models in both inputs with an OpenVINO latency: columns ``model``, ``ov_ms_b1``, ``image_mean`` and
    ``complete`` (the mean covers every category)."""
    if "ov_ms_b1" not in speed.columns:
        return pd.DataFrame(columns=["model", "ov_ms_b1", "image_mean", "complete"])
    latency = speed.dropna(subset=["ov_ms_b1"]).drop_duplicates("name", keep="last")
    means = model_means(summary)[["image_mean", "complete"]].reset_index()
    points = latency[["name", "ov_ms_b1"]].rename(columns={"name": "model"}).merge(means, on="model")
    return points.sort_values("model").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _cell(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return MISSING
    if n > 1 and pd.notna(std):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.3f}"


def _number(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return MISSING
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "/")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def accuracy_table(summary: pd.DataFrame) -> list[str]:
    """Markdown lines: models x categories, image AUROC mean ± std, mean, pixel AUROC mean."""
    categories = list(dict.fromkeys(summary["category"]))
    means = model_means(summary)
    with_pixel = "pixel_mean" in means.columns and means["pixel_mean"].notna().any()
    headers = ["model", *categories, "mean"] + (["pixel AUROC (mean)"] if with_pixel else [])
    rows = []
    for model, group in summary.groupby("model", sort=True):
        cells = {
            row.category: _cell(row.image_mean, row.image_std, row.n_seeds) for row in group.itertuples()
        }
        mean = means.loc[model]
        row = [str(model), *(cells.get(c, MISSING) for c in categories)]
        row.append(f"{mean['image_mean']:.3f}" + ("" if mean["complete"] else "*"))
        if with_pixel:
            row.append(MISSING if pd.isna(mean["pixel_mean"]) else f"{mean['pixel_mean']:.3f}")
        rows.append(row)
    return _table(headers, rows)


def speed_table(speed: pd.DataFrame) -> list[str]:
    """Markdown lines: one row per model of the speed CSV."""
    # Throughput columns carry their batch size (eager_ips_b8, ov_ips_b8), eager first.
    throughput = sorted(
        (c for c in speed.columns if re.fullmatch(r"(eager|ov)_ips_b\d+", c)),
        key=lambda c: c.startswith("ov"),
    )
    columns = {
        "name": "model",
        "image_size": "input (px)",
        "params_m": "params (M)",
        "gflops": "GFLOPs",
        "eager_ms_b1": "eager ms (b1)",
        "ov_ms_b1": "OpenVINO ms (b1)",
        **{
            c: ("eager" if c.startswith("eager") else "OpenVINO") + f" img/s (b{c.rsplit('_b', 1)[1]})"
            for c in throughput
        },
        "eager_gflops_per_s": "eager GFLOP/s",
        "ov_gflops_per_s": "OpenVINO GFLOP/s",
        "peak_rss_gb": "peak RSS (GB)",
        "notes": "notes",
        "error": "error",
    }
    # Optional columns only when some row has them.
    columns = {
        key: title
        for key, title in columns.items()
        if key in speed.columns and (key not in {"notes", "error"} or speed[key].notna().any())
    }
    rows = [[_number(row[key]) for key in columns] for _, row in speed.iterrows()]
    if "error" in columns:  # keep the table readable: the first words of an error; the CSV has it whole
        index = list(columns).index("error")
        rows = [[*r[:index], _shorten(str(r[index])), *r[index + 1 :]] for r in rows]
    return _table(list(columns.values()), rows)


def _shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _distinct(frame: pd.DataFrame, column: str) -> str:
    if column not in frame.columns:
        return "unknown"
    values = [str(v) for v in dict.fromkeys(frame[column].dropna())]
    return ", ".join(values) if values else "unknown"


def _sources(results: pd.DataFrame, listed: int = 4) -> str:
    """The results files with their run dates; past ``listed`` files, their count, folder and date range."""
    sources = results.drop_duplicates("source")
    if len(sources) <= listed:
        return "; ".join(f"`{row.source}` ({row.run_date})" for row in sources.itertuples())
    folder = os.path.commonpath([str(Path(source).parent) for source in sources["source"]])
    dates = sorted(sources["run_date"])
    return f"{len(sources)} results CSVs under `{folder}` (runs dated {dates[0]} to {dates[-1]})"


def _datamodules_line(results: pd.DataFrame) -> str:
    """Which datamodule each model ran on, when they differ (e.g. few-shot vs one-class training)."""
    if "data.class_path" not in results.columns:
        return ""
    names = results["data.class_path"].map(short_model_name)
    if names.nunique() < 2:
        return ""
    groups = results.groupby(names, sort=True)["model"].unique()
    used = "; ".join(f"{data} for {', '.join(sorted(models))}" for data, models in groups.items())
    return f"Datamodules: {used}."


def _weights_line(results: pd.DataFrame, speed: pd.DataFrame | None, note: str | None) -> str:
    if note:
        return f"Weights: {note}"
    line = (
        "Weights: teachers / backbones were randomly initialised (`pre_trained=False`, no ImageNet "
        "weights), so absolute accuracy is far below the papers'."
    )
    column = "model.init_args.pre_trained"
    if column in results.columns:
        pretrained = results.loc[results[column].astype(str).str.lower() == "true", "model"].unique()
        if len(pretrained):
            names = ", ".join(sorted(pretrained))
            line += f" Exception in the accuracy runs: `pre_trained=True` for {names}."
    if speed is not None and "weights" in speed.columns:
        other = speed.loc[speed["weights"].astype(str) != "random", "name"].tolist()
        if other:
            line += f" Speed runs not on random weights: {', '.join(other)}."
    return line


def render_markdown(
    results: pd.DataFrame,
    speed: pd.DataFrame | None = None,
    *,
    image_prefix: str = "",
    with_latency_plot: bool = False,
    weights_note: str | None = None,
) -> str:
    """The report body (no title, so it can sit inside a README). Images are linked as
    ``image_prefix + file name``."""
    summary = summarize(results)
    seeds = summary["n_seeds"]
    seed_text = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()} to {seeds.max()}"
    # A list, so the provenance lines stay separate lines once rendered.
    lines = [
        f"- Accuracy: `anomalib benchmark`, {len(results)} jobs from {_sources(results)}; accelerator "
        f"{_distinct(results, 'accelerator')}.",
    ]
    if speed is not None:
        openvino = _distinct(speed, "openvino").split("-")[0]
        lines.append(
            f"- Speed: measured {_distinct(speed, 'date')} on {_distinct(speed, 'machine')} "
            f"({_distinct(speed, 'cores')} cores), torch {_distinct(speed, 'torch')}, OpenVINO {openvino}, "
            f"commit `{_distinct(speed, 'commit')}`."
        )
    lines += [
        f"- Report generated {datetime.now().astimezone().isoformat(timespec='seconds')} on {cpu_model()} "
        f"({os.cpu_count()} cores), commit `{git_commit()}`.",
        "- " + _weights_line(results, speed, weights_note),
        "",
        *accuracy_table(summary),
        "",
        f"Image AUROC per category: mean ± sample standard deviation over seeds ({seed_text} per cell); "
        "`mean`: mean of the category means (* = not every category was run); pixel AUROC: mean over "
        "categories.",
    ]
    lines += harness_notes(summary["model"])
    datamodules = _datamodules_line(results)
    if datamodules:
        lines[-1] += f" {datamodules}"
    if results.attrs.get("duplicates_dropped"):
        lines[-1] += f" {results.attrs['duplicates_dropped']} repeated job(s) ignored (the newest kept)."
    configs = _configurations(results)
    if configs:
        lines += ["", "Model configurations (from the results' `model.init_args`):", "", *configs]
    lines += ["", f"![Image AUROC per category]({image_prefix}{PER_CATEGORY_PLOT})"]
    if speed is not None:
        lines += [
            "",
            *speed_table(speed),
            "",
            "Latency per image at batch 1 (median after warm-up) and throughput at the batch shown, "
            "random weights, each model in its own process; OpenVINO compiled with f32 inference precision. "
            "GFLOPs per image count convolutions and matrix products only (`FlopCounterMode`), so "
            "elementwise work such as the selective scan's recurrence is not in them; GFLOP/s = GFLOPs / "
            "latency.",
        ]
        if with_latency_plot:
            lines += ["", f"![Mean image AUROC vs OpenVINO latency]({image_prefix}{LATENCY_PLOT})"]
    return "\n".join(lines) + "\n"


def _configurations(results: pd.DataFrame) -> list[str]:
    columns = [c for c in results.columns if c.startswith("model.init_args.")]
    lines = []
    for model, group in results.groupby("model", sort=True):
        first = group.iloc[0]
        # _number: concatenated CSVs turn integer args into floats (16.0) where other runs lack them.
        args = [
            f"{c.removeprefix('model.init_args.')}={_number(first[c])}" for c in columns if pd.notna(first[c])
        ]
        if args:
            lines.append(f"- {model}: {', '.join(args)}")
    return lines


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_auroc_per_category(summary: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: image AUROC per category (groups) and model (bars), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    categories = list(dict.fromkeys(summary["category"]))
    models = sorted(summary["model"].unique())
    width = 0.8 / len(models)
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) * max(1, len(models) / 3)), 4.0))
    for i, model in enumerate(models):
        rows = summary[summary["model"] == model].set_index("category").reindex(categories)
        ax.bar(
            x + (i - (len(models) - 1) / 2) * width,
            rows["image_mean"].to_numpy(dtype=float),
            width,
            yerr=rows["image_std"].fillna(0).to_numpy(dtype=float),
            capsize=3,
            label=model,
        )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance level
    crowded = len(categories) > 5  # slanted labels then, so long category names do not overlap
    ax.set_xticks(x, categories, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("image AUROC")
    ax.set_title("Image AUROC per category (mean ± std over seeds)")
    # Outside the axes: AUROC bars fill most of the plot, so any inside corner would hide some.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_auroc_vs_latency(points: pd.DataFrame, path: Path) -> Path:
    """Scatter of mean image AUROC against OpenVINO latency (log x), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.scatter(points["ov_ms_b1"], points["image_mean"], zorder=3)
    for row in points.itertuples():
        label = row.model if row.complete else f"{row.model}*"  # * as in the table: not every category
        ax.annotate(label, (row.ov_ms_b1, row.image_mean), textcoords="offset points", xytext=(5, 4))
    if not points["complete"].all():
        ax.set_title("* mean over the categories that were run", fontsize=9, loc="left")
    ax.set_xscale("log")
    ax.set_xlabel("OpenVINO f32 latency per image, batch 1 (ms, log scale)")
    ax.set_ylabel("mean image AUROC over categories")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# README and report files
# --------------------------------------------------------------------------------------------------


def replace_between_markers(text: str, content: str) -> str:
    """``text`` with everything between the start and end markers replaced by ``content``."""
    starts, ends = text.count(START_MARKER), text.count(END_MARKER)
    if starts != 1 or ends != 1:
        msg = (
            f"Expected exactly one '{START_MARKER}' and one '{END_MARKER}' marker, found {starts} and "
            f"{ends}. Add them where the report should go."
        )
        raise BenchmarkReportError(msg)
    head, rest = text.split(START_MARKER)
    middle, tail = rest.split(END_MARKER) if END_MARKER in rest else (None, None)
    if middle is None:
        msg = f"'{END_MARKER}' comes before '{START_MARKER}'."
        raise BenchmarkReportError(msg)
    return f"{head}{START_MARKER}\n{content.strip()}\n{END_MARKER}{tail}"


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote."""

    report: Path
    per_category_plot: Path
    latency_plot: Path | None
    readme: Path | None


def write_report(
    results: pd.DataFrame,
    output: str | Path,
    speed: pd.DataFrame | None = None,
    readme: str | Path | None = None,
    weights_note: str | None = None,
) -> ReportFiles:
    """Write ``report.md`` and the plots to ``output`` (and the report into ``readme``'s markers)."""
    output = Path(output)
    readme_text = None
    if readme is not None:
        readme = Path(readme)
        if not readme.is_file():
            msg = f"README {readme} does not exist."
            raise BenchmarkReportError(msg)
        readme_text = readme.read_text(encoding="utf-8")
        replace_between_markers(readme_text, "")  # fail on missing markers before writing anything
    output.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    per_category = plot_auroc_per_category(summary, output / PER_CATEGORY_PLOT)
    latency_plot = None
    if speed is not None:
        points = latency_points(summary, speed)
        if points.empty:
            print(
                "No model is in both the results and the speed CSV (or none has an OpenVINO latency): "
                f"{LATENCY_PLOT} not written. Results: {sorted(summary['model'].unique())}; speed: "
                f"{sorted(speed['name'].unique())}."
            )
        else:
            latency_plot = plot_auroc_vs_latency(points, output / LATENCY_PLOT)
    options = {"speed": speed, "with_latency_plot": latency_plot is not None, "weights_note": weights_note}
    report = output / "report.md"
    report.write_text("# Benchmark report\n\n" + render_markdown(results, **options), encoding="utf-8")
    if readme is not None and readme_text is not None:
        # Image links relative to the README's folder, so they resolve where the README is rendered.
        prefix = Path(os.path.relpath(output.resolve(), readme.resolve().parent)).as_posix() + "/"
        body = render_markdown(results, image_prefix=prefix, **options)
        readme.write_text(replace_between_markers(readme_text, body), encoding="utf-8")
    return ReportFiles(
        report=report, per_category_plot=per_category, latency_plot=latency_plot, readme=readme
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_kd.tools.benchmark_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--results",
        nargs="+",
        default=["runs/benchmark"],
        help="results CSV files or folders searched recursively for results.csv (default: runs/benchmark)",
    )
    parser.add_argument("--speed", type=Path, help="speed CSV of examples/benchmarks/speed.py")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"), help="output folder")
    parser.add_argument("--readme", type=Path, help="file whose report markers get the report")
    parser.add_argument("--weights-note", help="replaces the 'randomly initialised' weights line")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
        speed = load_speed(args.speed) if args.speed else None
        files = write_report(results, args.output, speed, args.readme, args.weights_note)
    except BenchmarkReportError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    for path in (files.report, files.per_category_plot, files.latency_plot, files.readme):
        if path is not None:
            print(f"Wrote {path}")


if __name__ == "__main__":
    main()
