"""The benchmark report on fixture CSVs laid out like anomalib's ``anomalib benchmark`` results."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from PIL import Image

from anomalib_kd.tools import benchmark_report as br

CATEGORIES = ["brick", "grass"]
SEEDS = [42, 111]
# (class path as a benchmark config would give it, init args, short name)
MODELS = [
    ("URD", {"backbone": "resnet18", "pre_trained": False, "iterations": 16}, "URD"),
    ("anomalib.models.ReverseDistillation", {"pre_trained": False}, "ReverseDistillation"),
]


def _auroc(model: int, category: int, seed: int, pixel: bool = False) -> float:
    """Distinct, irregular numbers per job, so a mix-up of rows changes the table."""
    return round(0.55 + 0.1 * model + 0.07 * category + 0.013 * seed % 0.09 + (0.02 if pixel else 0), 4)


def _rows(model_index: int) -> list[dict[str, object]]:
    """One benchmark run's rows, columns in the order BenchmarkJob.run builds them."""
    class_path, init_args, _ = MODELS[model_index]
    rows = []
    for c, category in enumerate(CATEGORIES):
        for seed in SEEDS:
            rows.append(
                {
                    "accelerator": "cpu",
                    "job_duration": 301.5,
                    "fit_duration": 250.1,
                    "test_duration": 40.2,
                    "seed": seed,
                    "model.class_path": class_path,
                    **{f"model.init_args.{k}": v for k, v in init_args.items()},
                    "data.class_path": "Textures",
                    "data.init_args.category": category,
                    "data.init_args.train_batch_size": 8,
                    "data.init_args.eval_batch_size": 8,
                    "image_AUROC": _auroc(model_index, c, seed),
                    "image_F1Score": 0.7,
                    "pixel_AUROC": _auroc(model_index, c, seed, pixel=True),
                    "pixel_F1Score": 0.3,
                }
            )
    return rows


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """runs/benchmark/<date>/results.csv, one run folder per model (as two benchmark runs give)."""
    root = tmp_path / "runs" / "benchmark"
    _write_csv(root / "2026-11-20-10_00_00" / "results.csv", _rows(0))
    _write_csv(root / "2026-11-21-09_30_00" / "results.csv", _rows(1))
    return root


@pytest.fixture
def speed_csv(tmp_path: Path) -> Path:
    rows = [
        {"model": "urd_r18", "image_size": 256, "params_m": 189.8, "gflops": 70.1, "eager_ms_b1": 679.0,
         "ov_ms_b1": 478.0, "eager_ips_b8": 1.69, "ov_ips_b8": 2.15, "eager_gflops_per_s": 103.2,
         "ov_gflops_per_s": 146.7, "peak_rss_gb": 3.85, "weights": "random", "date": "2026-11-23T10:00:00",
         "machine": "Test CPU", "cores": 2, "torch": "2.10", "openvino": "2026.4.1-1", "commit": "abc1234",
         "notes": "", "error": ""},
        {"model": "rd", "image_size": 256, "params_m": 89.0, "gflops": 56.9, "eager_ms_b1": 386.0,
         "ov_ms_b1": 281.0, "eager_ips_b8": 2.87, "ov_ips_b8": 3.59, "eager_gflops_per_s": 147.4,
         "ov_gflops_per_s": 202.5, "peak_rss_gb": 2.57, "weights": "random", "date": "2026-11-23T10:00:00",
         "machine": "Test CPU", "cores": 2, "torch": "2.10", "openvino": "2026.4.1-1", "commit": "abc1234",
         "notes": "", "error": ""},
        # Only in the speed CSV: must not reach the scatter plot.
        {"model": "pdd", "image_size": 256, "params_m": 119.4, "gflops": 40.0, "eager_ms_b1": 1268.0,
         "ov_ms_b1": 1172.0, "eager_ips_b8": 0.57, "ov_ips_b8": 0.73, "eager_gflops_per_s": 31.5,
         "ov_gflops_per_s": 34.1, "peak_rss_gb": 8.28, "weights": "random", "date": "2026-11-23T10:00:00",
         "machine": "Test CPU", "cores": 2, "torch": "2.10", "openvino": "2026.4.1-1", "commit": "abc1234",
         "notes": "", "error": ""},
    ]  # fmt: skip
    return _write_csv(tmp_path / "speed.csv", rows)


def _expected(model_index: int, metric: str = "image_AUROC") -> dict[str, list[float]]:
    """Per category, the fixture's values of ``metric`` over seeds."""
    values: dict[str, list[float]] = {}
    for row in _rows(model_index):
        values.setdefault(str(row["data.init_args.category"]), []).append(float(row[metric]))  # type: ignore[arg-type]
    return values


def _table(markdown: str, first_header: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose first header cell is ``first_header``: row name -> column -> cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(headers, cells, strict=True))
    return table


def test_accuracy_cells_are_mean_and_std_over_seeds(runs: Path, tmp_path: Path) -> None:
    files = br.write_report(br.load_results([runs]), tmp_path / "out")
    table = _table(files.report.read_text(), "model")
    assert set(table) == {name for _, _, name in MODELS}
    for index, (_, _, name) in enumerate(MODELS):
        image, pixel = _expected(index), _expected(index, "pixel_AUROC")
        for category, values in image.items():
            assert table[name][category] == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        category_means = [statistics.mean(v) for v in image.values()]
        assert table[name]["mean"] == f"{statistics.mean(category_means):.3f}"
        pixel_means = [statistics.mean(v) for v in pixel.values()]
        assert table[name]["pixel AUROC (mean)"] == f"{statistics.mean(pixel_means):.3f}"


def test_summary_values(runs: Path) -> None:
    summary = br.summarize(br.load_results([runs])).set_index(["model", "category"])
    for index, (_, _, name) in enumerate(MODELS):
        for category, values in _expected(index).items():
            row = summary.loc[(name, category)]
            assert row["image_mean"] == pytest.approx(statistics.mean(values))
            assert row["image_std"] == pytest.approx(statistics.stdev(values))
            assert row["n_seeds"] == len(SEEDS)


def test_rerun_rows_are_not_counted_twice(runs: Path) -> None:
    once = br.summarize(br.load_results([runs]))
    twice_data = br.load_results([runs, next(runs.rglob("results.csv"))])
    assert twice_data.attrs["duplicates_dropped"] == len(_rows(0))
    assert br.summarize(twice_data).equals(once)


def test_speed_table_and_latency_join(runs: Path, speed_csv: Path, tmp_path: Path) -> None:
    results, speed = br.load_results([runs]), br.load_speed(speed_csv)
    files = br.write_report(results, tmp_path / "out", speed)
    report = files.report.read_text()
    speed_rows = _table(report, "model | input (px)")
    assert set(speed_rows) == {"URD", "ReverseDistillation", "PDD"}
    assert speed_rows["ReverseDistillation"]["OpenVINO ms (b1)"] == "281"
    assert speed_rows["URD"]["OpenVINO img/s (b8)"] == "2.15"
    assert "Test CPU (2 cores)" in report
    assert "commit `abc1234`" in report
    assert "randomly initialised" in report
    points = br.latency_points(br.summarize(results), speed).set_index("model")
    assert sorted(points.index) == ["ReverseDistillation", "URD"]  # PDD has no accuracy rows
    urd_means = [statistics.mean(v) for v in _expected(0).values()]
    assert points.loc["URD", "image_mean"] == pytest.approx(statistics.mean(urd_means))
    assert points.loc["URD", "ov_ms_b1"] == 478.0
    assert points["complete"].all()
    urd_on_brick_only = results[(results["model"] != "URD") | (results["category"] == "brick")]
    partial = br.latency_points(br.summarize(urd_on_brick_only), speed)
    assert not partial.set_index("model").loc["URD", "complete"]


def test_plots_are_valid_images(runs: Path, speed_csv: Path, tmp_path: Path) -> None:
    files = br.write_report(br.load_results([runs]), tmp_path / "out", br.load_speed(speed_csv))
    assert files.latency_plot is not None
    for path in (files.per_category_plot, files.latency_plot):
        assert path.stat().st_size > 5_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 300
            low, high = image.convert("L").getextrema()
            assert high - low > 100  # something is drawn, not a blank canvas


def test_no_latency_plot_without_speed(runs: Path, tmp_path: Path) -> None:
    files = br.write_report(br.load_results([runs]), tmp_path / "out")
    assert files.latency_plot is None
    assert not (tmp_path / "out" / br.LATENCY_PLOT).exists()
    assert br.LATENCY_PLOT not in files.report.read_text()


def test_speed_without_common_models_gives_no_latency_plot(
    runs: Path, speed_csv: Path, tmp_path: Path
) -> None:
    speed = br.load_speed(speed_csv)
    only_pdd = speed[speed["model"] == "pdd"].reset_index(drop=True)
    files = br.write_report(br.load_results([runs]), tmp_path / "out", only_pdd)
    assert files.latency_plot is None
    assert not (tmp_path / "out" / br.LATENCY_PLOT).exists()
    assert "| PDD |" in files.report.read_text()  # the speed table still lists it


def test_weights_note_replaces_default_line(runs: Path, tmp_path: Path) -> None:
    files = br.write_report(br.load_results([runs]), tmp_path / "out", weights_note="ImageNet teachers.")
    report = files.report.read_text()
    assert "Weights: ImageNet teachers." in report
    assert "randomly initialised" not in report


def test_readme_markers_replaced_and_rest_kept(runs: Path, speed_csv: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before = "# Project\n\nIntro text.\n\n## Results\n\n"
    after = "\n\n## License\n\nApache-2.0\n"
    readme.write_text(f"{before}{br.START_MARKER}\nold table\n{br.END_MARKER}{after}")
    results, speed = br.load_results([runs]), br.load_speed(speed_csv)
    br.write_report(results, tmp_path / "docs" / "bench", speed, readme=readme)
    text = readme.read_text()
    assert text.startswith(before + br.START_MARKER + "\n")
    assert text.endswith(br.END_MARKER + after)
    assert "old table" not in text
    inside = text[len(before) + len(br.START_MARKER) : -len(br.END_MARKER + after)]
    assert "| URD |" in inside and "| ReverseDistillation |" in inside
    # Image links resolve from the README's folder.
    assert f"](docs/bench/{br.PER_CATEGORY_PLOT})" in inside
    # A second run replaces, not appends.
    br.write_report(results, tmp_path / "docs" / "bench", speed, readme=readme)
    assert readme.read_text().count("| URD |") == 2  # once in the accuracy table, once in the speed table


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{br.START_MARKER}\nonly the start\n",
        f"{br.END_MARKER}\nend before start\n{br.START_MARKER}\n",
    ],
)
def test_missing_markers_error(runs: Path, tmp_path: Path, text: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(br.BenchmarkReportError, match=r"marker|before"):
        br.write_report(br.load_results([runs]), tmp_path / "out", readme=readme)
    assert readme.read_text() == text
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_no_results_csv_error_names_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "other.csv").write_text("a,b\n1,2\n")  # only results.csv files count in folders
    with pytest.raises(br.BenchmarkReportError, match=r"No results\.csv found.*nothing_here"):
        br.load_results([empty])
    with pytest.raises(br.BenchmarkReportError, match="does not exist"):
        br.load_results([tmp_path / "missing"])


def test_csv_without_image_auroc_error(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "image_AUROC"} for row in _rows(0)]
    path = _write_csv(tmp_path / "results.csv", rows)
    with pytest.raises(br.BenchmarkReportError, match="no 'image_AUROC' column"):
        br.load_results([path])


def test_cli_writes_report_and_reports_errors(
    runs: Path, speed_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli_out"
    br.main(["--results", str(runs), "--speed", str(speed_csv), "--output", str(out)])
    assert {p.name for p in out.iterdir()} == {"report.md", br.PER_CATEGORY_PLOT, br.LATENCY_PLOT}
    with pytest.raises(SystemExit) as exit_info:
        br.main(["--results", str(tmp_path / "empty_dir_missing"), "--output", str(out)])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err


def test_model_names_join() -> None:
    for class_path in (
        "anomalib_kd.models.dhkd.lightning_model.DHKD",
        "DHKD",
        "anomalib.models.DHKD",
        "BudgetedDHKD",
    ):
        assert br.short_model_name(class_path) == "DHKD"
    assert br.short_model_name("anomalib.models.ReverseDistillation") == "ReverseDistillation"
    expected = {
        "rd": "ReverseDistillation",
        "efficientad": "EfficientAd",
        "patchcore": "Patchcore",
        "urd_r18": "URD",
        "urd": "URD (WRN50-2)",
        "dhkd": "DHKD",
        "pdd": "PDD",
        "d24fad": "D24FAD",
    }
    for key, name in expected.items():
        assert br.speed_model_name(key) == name


def test_two_configurations_of_one_class_are_kept_apart(tmp_path: Path) -> None:
    r18 = _rows(0)
    wrn = [{**row, "model.init_args.backbone": "wide_resnet50_2", "image_AUROC": 0.99} for row in r18]
    _write_csv(tmp_path / "a" / "results.csv", r18)
    _write_csv(tmp_path / "b" / "results.csv", wrn)
    summary = br.summarize(br.load_results([tmp_path]))
    assert set(summary["model"]) == {"URD (backbone=resnet18)", "URD (backbone=wide_resnet50_2)"}
    assert (summary.loc[summary["model"] == "URD (backbone=wide_resnet50_2)", "image_mean"] == 0.99).all()


def test_run_date_from_a_copied_folder_name_not_the_mtime(tmp_path: Path) -> None:
    copy = _write_csv(tmp_path / "suite" / "urd_brick_seed0_2026-11-20-10_05_00" / "results.csv", _rows(0))
    plain = _write_csv(tmp_path / "plain" / "results.csv", _rows(1))
    results = br.load_results([copy, plain])
    dates = dict(zip(results["source"], results["run_date"], strict=True))
    assert dates[str(copy)] == "2026-11-20 10:05"
    assert dates[str(plain)] != "2026-11-20 10:05"  # no date in its path: the file's mtime (today)


def test_models_on_different_datamodules_share_category_columns(tmp_path: Path) -> None:
    one_class = _rows(1)
    few_shot = [
        {**row, "model.class_path": "D24FAD", "data.class_path": "FewShotTasks", "image_AUROC": 0.61}
        for row in _rows(0)
    ]
    _write_csv(tmp_path / "a" / "results.csv", one_class)
    _write_csv(tmp_path / "b" / "results.csv", few_shot)
    markdown = br.render_markdown(br.load_results([tmp_path]))
    table = _table(markdown, "model")
    assert table["D24FAD"]["brick"] == "0.610 ± 0.000"
    assert table["ReverseDistillation"]["brick"] != "-"
    assert "Datamodules: FewShotTasks for D24FAD; Textures for ReverseDistillation." in markdown


def test_many_results_files_are_summarised_by_folder_and_dates(tmp_path: Path) -> None:
    for index, category in enumerate(CATEGORIES * 3):
        rows = [{**row, "seed": index} for row in _rows(0) if row["data.init_args.category"] == category]
        _write_csv(tmp_path / "suite" / f"urd_{category}_2026-11-2{index}-10_00_00" / "results.csv", rows)
    markdown = br.render_markdown(br.load_results([tmp_path / "suite"]))
    dates = "(runs dated 2026-11-20 10:00 to 2026-11-25 10:00)"
    assert f"6 results CSVs under `{tmp_path / 'suite'}` {dates}" in markdown
    assert "urd_brick_2026-11-20" not in markdown
