"""KDBench: finding the kdbench folder offline, loading a category, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.kdbench import KDBENCH_ENV, KDBench, KDBenchTasks, resolve_kdbench_root

from tests.helpers import make_tasks

CATEGORIES = ("brick", "head_ct")


@pytest.fixture
def tiny_kdbench(tmp_path: Path) -> Path:
    return make_tasks(tmp_path / "kdbench", names=CATEGORIES, n_train=4, sizes=(32,), n_test=2)


def test_root_argument_then_env_var(
    tiny_kdbench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KDBENCH_ENV, str(tiny_kdbench))
    assert resolve_kdbench_root() == tiny_kdbench
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_kdbench_root(other) == other  # the argument wins over the variable


def test_missing_data_names_the_places_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KDBENCH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    # The checkout fallback (../shared next to the repo) may exist on a developer machine: hide it.
    monkeypatch.setattr("harness.kdbench._candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match=KDBENCH_ENV) as error:
        resolve_kdbench_root()
    assert "nowhere" in str(error.value)
    monkeypatch.setenv(KDBENCH_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_kdbench_root()


def test_category_loads_with_masks(tiny_kdbench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KDBENCH_ENV, str(tiny_kdbench))
    datamodule = KDBench(category="head_ct", train_batch_size=2, eval_batch_size=4)
    datamodule.setup()
    assert len(datamodule.train_data) == 4
    assert len(datamodule.test_data) == 4
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_mask is not None
    assert int(batch.gt_label.sum()) == 2
    assert batch.gt_mask[batch.gt_label.bool()].any()


def test_unknown_category_lists_the_available_ones(tiny_kdbench: Path) -> None:
    datamodule = KDBench(root=tiny_kdbench, category="bottle")
    with pytest.raises(FileNotFoundError, match="brick, head_ct"):
        datamodule.prepare_data()


def test_kdbench_tasks_find_the_folder(tiny_kdbench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The few-shot view of kdbench finds its folder as KDBench does (FewShotTasks itself needs root)."""
    monkeypatch.setenv(KDBENCH_ENV, str(tiny_kdbench))
    datamodule = KDBenchTasks(target="brick", k_shot=2)
    assert datamodule.root == tiny_kdbench
    datamodule.setup()
    assert datamodule.train_task_names == ["head_ct"]
