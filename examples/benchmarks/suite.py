"""The whole benchmark in one command: accuracy (stock ``anomalib benchmark``), speed, report.

    python examples/benchmarks/suite.py                                # everything, default CPU budgets
    python examples/benchmarks/suite.py --seeds 0 --categories brick   # a quick subset
    python examples/benchmarks/suite.py --models dhkd reverse_distillation --skip-speed

1. Accuracy: anomalib's own benchmark (``run_benchmark.py --config``: ``anomalib benchmark`` with the
   harness's ``Budgeted<Model>`` classes and ``KDBench`` registered) on each job of
   ``examples/benchmarks/configs/<model>.yaml`` (one category and seed per process, so an interrupted or
   failing job never loses the finished ones), with the seeds/categories narrowed when asked. Each writes
   ``<output>/runs/<model>/<category>_seed<seed>/runs/benchmark/<date>/results.csv``.
2. Speed: ``examples/benchmarks/speed.py`` (eager and OpenVINO latency, throughput, memory, FLOPs) to
   ``<output>/speed.csv``.
3. Report: ``python -m anomalib_kd.tools.benchmark_report`` turns both into ``<output>/report.md`` and two
   plots, and with ``--readme README.md`` rewrites the README's results block.

Data: kdbench, found by the harness's ``KDBench`` (``--data`` or ``$ANOMALIB_KD_KDBENCH``, else
``../shared/data/kdbench``). Teachers are random-initialised unless the configs are edited to load weights.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RUNNER = HERE / "run_benchmark.py"
# Runner environment. glibc's dynamic mmap threshold let anomalib's Patchcore coreset loop keep its freed
# ~31 MB temporaries on the heap (~20 MB growth per selected point, OOM-killed at 24 GB here); a fixed
# threshold returns them to the OS. An allocator setting, so it lives here and not in a model class.
RUNNER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
MODELS = ["urd", "dhkd", "pdd", "d24fad", "reverse_distillation", "efficientad", "patchcore"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="configs/<name>.yaml to run")
    parser.add_argument("--data", type=Path, default=None, help="kdbench root (sets $ANOMALIB_KD_KDBENCH)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the configs' seed grid")
    parser.add_argument("--categories", nargs="+", default=None, help="override the category/target grid")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--skip-accuracy", action="store_true", help="reuse the results CSVs under --output")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--resume", action="store_true", help="skip the jobs whose folder under --output already has results"
    )
    parser.add_argument(
        "--speed-args",
        default="--repeats 5 --models urd_r18 dhkd pdd d24fad rd efficientad patchcore urd",
        help="arguments for speed.py (urd_r18 is the URD the accuracy configs train)",
    )
    parser.add_argument("--readme", type=Path, default=None, help="README whose results block is rewritten")
    return parser.parse_args()


def _grid(value: object) -> list:
    return list(value["grid"]) if isinstance(value, dict) and "grid" in value else [value]


def single_job_configs(
    path: Path, seeds: list[int] | None, categories: list[str] | None
) -> list[tuple[str, dict]]:
    """The config at ``path`` split into one config per (category or few-shot target, seed).

    anomalib's benchmark writes its CSV only after its last job; one job per process keeps every finished
    job's results when a later one fails or the run is interrupted.
    """
    config = yaml.safe_load(path.read_text())
    init = config["benchmark"]["data"].setdefault("init_args", {})
    key = "target" if "target" in init else "category"
    jobs = []
    for category in categories if categories is not None else _grid(init.get(key)):
        for seed in seeds if seeds is not None else _grid(config["benchmark"]["seed"]):
            job = yaml.safe_load(yaml.safe_dump(config))  # deep copy
            job["benchmark"]["seed"] = seed
            job["benchmark"]["data"]["init_args"][key] = category
            jobs.append((f"{category}_seed{seed}", job))
    return jobs


def run_accuracy(args: argparse.Namespace, env: dict[str, str]) -> list[Path]:
    """anomalib benchmark runs (:data:`RUNNER`), one process per job; returns the results CSVs written."""
    env = {**env, **RUNNER_ENV}
    csvs = []
    for name in args.models:
        source = CONFIGS / f"{name}.yaml"
        if not source.is_file():
            print(f"[{name}] no config {source}; skipped", flush=True)
            continue
        for job_name, job in single_job_configs(source, args.seeds, args.categories):
            workdir = (args.output / "runs" / name / job_name).resolve()
            done = sorted(workdir.glob("runs/benchmark/*/results.csv"))
            if args.resume and done:
                print(f"[{name} {job_name}] kept {done[-1]}", flush=True)
                csvs.append(done[-1])
                continue
            workdir.mkdir(parents=True, exist_ok=True)
            config = workdir / "config.yaml"
            config.write_text(yaml.safe_dump(job, sort_keys=False))
            log = workdir / "benchmark.log"
            print(f"[{name} {job_name}] run_benchmark.py --config {config}", flush=True)
            tic = time.time()
            with log.open("w") as handle:
                command = [sys.executable, str(RUNNER), "--config", str(config)]
                code = subprocess.call(command, cwd=workdir, env=env, stdout=handle, stderr=handle)
            found = sorted(workdir.glob("runs/benchmark/*/results.csv"))
            status = "ok" if code == 0 and found else f"FAILED (exit {code}; see {log})"
            print(f"[{name} {job_name}] {status} in {time.time() - tic:.0f} s", flush=True)
            csvs.extend(found[-1:])
    return csvs


def main() -> None:
    args = parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.data is not None:
        env["ANOMALIB_KD_KDBENCH"] = str(args.data.resolve())
    started = time.time()
    if not args.skip_accuracy:
        run_accuracy(args, env)
    speed_csv = args.output / "speed.csv"
    if not args.skip_speed:
        speed = REPO / "examples" / "benchmarks" / "speed.py"
        command = [sys.executable, str(speed), "--output", str(speed_csv)]
        print("speed:", " ".join(command + args.speed_args.split()), flush=True)
        subprocess.call(command + args.speed_args.split(), env=env)
    report = [sys.executable, "-m", "anomalib_kd.tools.benchmark_report"]
    report += ["--results", str(args.output / "runs"), "--output", str(args.output)]
    if speed_csv.is_file():
        report += ["--speed", str(speed_csv)]
    if args.readme is not None:
        report += ["--readme", str(args.readme)]
    code = subprocess.call(report, env=env)
    print(f"suite done in {time.time() - started:.0f} s; report: {args.output / 'report.md'}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
