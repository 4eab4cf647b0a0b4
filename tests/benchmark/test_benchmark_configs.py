"""The benchmark suite: every ``examples/benchmarks/configs/*.yaml`` resolves through anomalib's own loaders
once the harness is registered, the budgeted models carry their budget, and the runner (anomalib's own
benchmark) works offline end to end."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import pytest
import yaml
from anomalib.data import get_datamodule
from anomalib.models import get_model
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from harness import BudgetedEfficientAd, register_harness
from harness.kdbench import KDBENCH_CATEGORIES, KDBENCH_ENV

from anomalib_kd import D24FAD, DHKD, PDD, URD
from tests.helpers import load_script, make_tasks, run_cli

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "examples" / "benchmarks"
SUITE = sorted((BENCHMARKS / "configs").glob("*.yaml"))

EXPECTED = {"urd": URD, "dhkd": DHKD, "pdd": PDD, "d24fad": D24FAD, "efficientad": "EfficientAd",
            "reverse_distillation": "ReverseDistillation", "patchcore": "Patchcore"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_kdbench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kdbench")
    return make_tasks(root, names=KDBENCH_CATEGORIES, n_train=9, sizes=(64,), n_test=2)


def _jobs(path: Path) -> list[dict]:
    return list(get_iterator_from_grid_dict(yaml.safe_load(path.read_text())["benchmark"]))


def test_suite_covers_every_model() -> None:
    assert {p.stem for p in SUITE} == set(EXPECTED)


@pytest.mark.parametrize("config", SUITE, ids=lambda p: p.stem)
def test_config_resolves_every_job(config: Path, tiny_kdbench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KDBENCH_ENV, str(tiny_kdbench))
    register_harness()
    jobs = _jobs(config)
    assert len({job["seed"] for job in jobs}) >= 2, "several seeds"
    categories = {
        job["data"]["init_args"].get("category", job["data"]["init_args"].get("target")) for job in jobs
    }
    assert categories == set(KDBENCH_CATEGORIES)
    for (
        job
    ) in jobs:  # every datamodule resolves through anomalib's own loader, with the data found via the env
        datamodule = get_datamodule(job["data"])
        assert Path(datamodule.root) == tiny_kdbench
    model = get_model(
        jobs[0]["model"]
    )  # the budgeted class, resolved by anomalib's get_model from its bare name
    expected = EXPECTED[config.stem]
    base_names = [cls.__name__ for cls in type(model).__mro__]
    assert (expected if isinstance(expected, str) else expected.__name__) in base_names
    budget = model.trainer_arguments
    assert budget["max_epochs"] == jobs[0]["model"]["init_args"]["max_epochs"]
    assert 0 < budget["max_epochs"] <= 5, "the default budget must stay CPU-sized"
    size = jobs[0]["model"]["init_args"]["image_size"]
    transform = model.pre_processor.transform
    resize = transform.transforms[0] if hasattr(transform, "transforms") else transform  # D24FAD: one Lanczos
    assert list(resize.size) == [size, size]


def test_budget_overrides_only_the_trainer_arguments() -> None:
    model = BudgetedEfficientAd(max_epochs=3, limit_train_batches=4, image_size=64)
    assert model.trainer_arguments == {"num_sanity_val_steps": 0, "max_epochs": 3, "max_steps": -1,
                                       "limit_train_batches": 4}  # fmt: skip
    assert type(model).__mro__[2].__name__ == "EfficientAd"


@pytest.mark.heavy  # ~2 minutes on a 2-core CPU: `.ci/run` runs it with `-m heavy`
def test_stock_benchmark_runs_efficientad_offline(tiny_kdbench: Path, tmp_path: Path) -> None:
    """anomalib would download EfficientAd's teacher and ImageNette: the budgeted class needs neither."""
    job = yaml.safe_load((BENCHMARKS / "configs" / "efficientad.yaml").read_text())
    job["benchmark"]["seed"] = 7
    job["benchmark"]["model"]["init_args"]["limit_train_batches"] = 2
    job["benchmark"]["data"]["init_args"]["category"] = "brick"
    config = tmp_path / "efficientad.yaml"
    config.write_text(yaml.safe_dump(job))
    cache = tmp_path / "cache"
    env = {KDBENCH_ENV: str(tiny_kdbench), "ANOMALIB_KD_CACHE": str(cache)}
    runner = [sys.executable, str(BENCHMARKS / "run_benchmark.py")]
    result = run_cli([*runner, "--config", str(config)], cwd=tmp_path, env=env)
    csvs = list(tmp_path.glob("runs/benchmark/*/results.csv"))
    assert csvs, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(csvs[0].open()))
    assert len(rows) == 1
    assert rows[0]["model.class_path"] == "BudgetedEfficientAd"
    assert 0.0 <= float(rows[0]["image_AUROC"]) <= 1.0
    assert len(list((cache / "efficientad_penalty" / "images").glob("*.png"))) >= 5


def test_suite_runs_one_job_per_process() -> None:
    """suite.py splits each config into single (category, seed) jobs, none lost or doubled."""
    suite = load_script(BENCHMARKS / "suite.py")
    for config in SUITE:
        expected = {_category_and_seed(job) for job in _jobs(config)}
        split = suite.single_job_configs(config, None, None)
        singles = [_jobs_of(job) for _, job in split]
        assert all(len(jobs) == 1 for jobs in singles)
        assert {_category_and_seed(jobs[0]) for jobs in singles} == expected
        assert len(split) == len(expected)
    assert len(suite.single_job_configs(SUITE[0], [3], ["brick"])) == 1


def test_suite_resume_keeps_finished_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume reuses a job's results CSV and starts only the jobs without one."""
    suite = load_script(BENCHMARKS / "suite.py")
    finished = tmp_path / "runs" / "patchcore" / "brick_seed0" / "runs" / "benchmark" / "2026-01-01"
    finished.mkdir(parents=True)
    (finished / "results.csv").write_text("model,seed\n")
    started = []
    monkeypatch.setattr(suite.subprocess, "call", lambda command, **_: started.append(command) or 1)
    args = argparse.Namespace(models=["patchcore"], seeds=[0, 1], categories=["brick"], output=tmp_path)
    for resume in (True, False):
        started.clear()
        csvs = suite.run_accuracy(argparse.Namespace(**vars(args), resume=resume), env={})
        assert len(started) == (1 if resume else 2)
        assert csvs == [finished / "results.csv"]
        assert (tmp_path / "runs" / "patchcore" / "brick_seed1" / "config.yaml").is_file()


def _category_and_seed(job: dict) -> tuple[str, int]:
    init = job["data"]["init_args"]
    return init.get("category", init.get("target")), job["seed"]


def _jobs_of(config: dict) -> list[dict]:
    return list(get_iterator_from_grid_dict(config["benchmark"]))


def test_runner_jobs_get_the_allocator_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Patchcore's coreset loop needs glibc's fixed mmap threshold (else: OOM at 24 GB inside the
    benchmark): the suite sets it in each job's environment, no model class touches the allocator."""
    suite = load_script(BENCHMARKS / "suite.py")
    seen = []
    monkeypatch.setattr(suite.subprocess, "call", lambda command, env, **_: seen.append((command, env)) or 1)
    args = argparse.Namespace(
        models=["patchcore"], seeds=[0], categories=["brick"], output=tmp_path, resume=False
    )
    suite.run_accuracy(args, env={"KEEP": "1"})
    ((command, env),) = seen
    assert command[1].endswith("run_benchmark.py")
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert env["KEEP"] == "1"
    assert "mallopt" not in (BENCHMARKS / "harness" / "models.py").read_text()


def test_reports_mark_the_baselines_the_harness_changes() -> None:
    from anomalib_kd.tools.benchmark_report import harness_notes, short_model_name

    assert short_model_name("BudgetedEfficientAd") == "EfficientAd†"
    assert short_model_name("EfficientAd") == "EfficientAd"  # a stock run is not marked
    assert short_model_name("BudgetedDHKD") == "DHKD"
    notes = harness_notes(["EfficientAd†", "Patchcore† (image_size=128)", "DHKD"])
    assert len(notes) == 2
    assert "random PDN teacher" in notes[0]
    assert "MALLOC_MMAP_THRESHOLD_" in notes[1]
