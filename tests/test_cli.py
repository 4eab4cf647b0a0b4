"""``anomalib-kd``: anomalib's CLI with registration first; ``benchmark`` accepts dotted class paths."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from anomalib_kd.cli import bare_class_paths, rewrite_benchmark_argv

from .conftest import TINY_TEXTURES
from .helpers import console_script, run_cli


def test_dotted_class_paths_become_the_registered_bare_names() -> None:
    config = {
        "accelerator": "cpu",
        "benchmark": {
            "model": {"class_path": {"grid": ["anomalib_kd.URD", "anomalib_kd.models.DHKD", "Padim"]}},
            "data": {"class_path": "anomalib_kd.data.Textures", "init_args": {"root": "anomalib_kd.URD"}},
        },
    }
    bare = bare_class_paths(config)
    assert bare["benchmark"]["model"]["class_path"]["grid"] == ["URD", "DHKD", "Padim"]
    assert bare["benchmark"]["data"]["class_path"] == "Textures"
    assert bare["benchmark"]["data"]["init_args"]["root"] == "anomalib_kd.URD"  # only class paths change
    assert config["benchmark"]["data"]["class_path"] == "anomalib_kd.data.Textures"  # input untouched


@pytest.mark.parametrize("inline", [False, True])
def test_benchmark_argv_points_at_a_rewritten_copy(tmp_path: Path, inline: bool) -> None:
    source = tmp_path / "bench.yaml"
    source.write_text(yaml.safe_dump({"benchmark": {"model": {"class_path": "anomalib_kd.PDD"}}}))
    folder = tmp_path / "copy"
    folder.mkdir()
    argv = (
        ["anomalib-kd", "benchmark", f"--config={source}"]
        if inline
        else ["x", "benchmark", "--config", str(source)]
    )
    rewritten = rewrite_benchmark_argv(argv, folder)
    config = Path(rewritten[-1].removeprefix("--config="))
    assert config.parent == folder
    assert yaml.safe_load(config.read_text())["benchmark"]["model"]["class_path"] == "PDD"
    assert rewritten[:-1] == argv[:-1]
    with pytest.raises(SystemExit, match=r"missing\.yaml"):
        rewrite_benchmark_argv(["x", "benchmark", "--config", str(tmp_path / "missing.yaml")], folder)


@pytest.mark.slow
def test_anomalib_kd_benchmark_runs_a_dotted_config(tiny_textures_root: Path, tmp_path: Path) -> None:
    """The spelling ``anomalib train`` accepts (``anomalib_kd.URD``) works in a benchmark config too."""
    data = {**TINY_TEXTURES, "root": str(tiny_textures_root)}
    config = {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 42,
            "model": {
                "class_path": "anomalib_kd.URD",
                "init_args": {"backbone": "resnet18", "pre_trained": False, "iterations": 1},
            },
            "data": {"class_path": "anomalib_kd.data.Textures", "init_args": data},
        },
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    run_cli([console_script("anomalib-kd"), "benchmark", "--config", str(path)], cwd=tmp_path)
    (results,) = tmp_path.glob("runs/benchmark/*/results.csv")
    (row,) = csv.DictReader(results.open())
    assert row["model.class_path"] == "URD"
    assert 0.0 <= float(row["image_AUROC"]) <= 1.0


def _urd_weights_built_by_cli(seed: str, root: Path) -> dict:
    """The URD student's initial weights as ``anomalib-kd train --seed_everything <seed>`` builds them."""
    import torch

    from anomalib_kd.cli import seeded_cli

    torch.manual_seed(12345)  # whatever ran before: the command's seed must decide
    cli = seeded_cli()(
        args=["train", "--model", "anomalib_kd.URD", "--model.backbone", "resnet18", "--model.pre_trained",
              "false", "--data", "anomalib_kd.data.Textures", "--data.root", str(root),
              "--seed_everything", seed],
        run=False,
    )  # fmt: skip
    return {key: value.clone() for key, value in cli.model.model.student.state_dict().items()}


def test_anomalib_kd_applies_seed_everything(tmp_path: Path) -> None:
    """anomalib 2.7's CLI parses --seed_everything but never seeds; ``anomalib-kd`` applies it, so the same
    seed builds the same initial weights and another seed other weights."""
    import os

    import torch

    first = _urd_weights_built_by_cli("7", tmp_path)
    assert torch.initial_seed() == 7
    assert os.environ.get("PL_GLOBAL_SEED") == "7"  # DDP's other processes inherit it
    again = _urd_weights_built_by_cli("7", tmp_path)
    other = _urd_weights_built_by_cli("8", tmp_path)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
