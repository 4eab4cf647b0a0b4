"""Few-shot episodic datamodule: sampling, leave-one-out, k-shot one-class mode, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_kd.data.fewshot import EpisodeBatch, FewShotDataError, FewShotTasks

from ..helpers import make_tasks


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_tasks(tmp_path / "tasks")


def episodes(datamodule: FewShotTasks) -> list[tuple[str, str, list[str]]]:
    data = datamodule.train_data
    return [
        (
            name,
            data.tasks[name].normals[query],
            [data.tasks[name].normals[i] for i in data.support_indices(index)],
        )
        for index, (name, query, _) in enumerate(data.episodes)
    ]


def test_episode_sampling_is_deterministic(root: Path) -> None:
    first = FewShotTasks(root=root, target="beta", k_shot=3, support_seed=7)
    second = FewShotTasks(root=root, target="beta", k_shot=3, support_seed=7)
    other = FewShotTasks(root=root, target="beta", k_shot=3, support_seed=8)
    for datamodule in (first, second, other):
        datamodule.setup()
    assert episodes(first) == episodes(second)
    assert episodes(first) != episodes(other)
    assert first.support_paths() == second.support_paths()
    # fixed supports: reading an episode twice gives the same support files
    assert first.train_data[0].support_paths == first.train_data[0].support_paths


def test_query_never_among_its_supports(root: Path) -> None:
    for resample in (False, True):
        datamodule = FewShotTasks(root=root, target="alpha", k_shot=5, resample_supports=resample)
        datamodule.setup()
        for _ in range(3 if resample else 1):
            for name, query, supports in episodes(datamodule):
                assert query not in supports
                assert len(set(supports)) == 5
                assert all(Path(s).parent == Path(query).parent for s in supports)  # same task
                assert Path(query).parts[-4] == name


def test_resampled_supports_change_between_reads(root: Path) -> None:
    datamodule = FewShotTasks(root=root, target="alpha", k_shot=2, resample_supports=True)
    datamodule.setup()
    torch.manual_seed(0)
    draws = {tuple(datamodule.train_data[0].support_paths) for _ in range(20)}
    assert len(draws) > 1
    torch.manual_seed(0)
    again = [tuple(datamodule.train_data[0].support_paths) for _ in range(5)]
    torch.manual_seed(0)
    assert again == [tuple(datamodule.train_data[0].support_paths) for _ in range(5)]


def test_leave_one_out_never_leaks_target(root: Path) -> None:
    datamodule = FewShotTasks(root=root, target="gamma", k_shot=2, train_batch_size=4)
    datamodule.setup()
    assert datamodule.train_task_names == ["alpha", "beta"]
    target_dir = str(root / "gamma")
    seen_tasks = set()
    for name, query, supports in episodes(datamodule):
        seen_tasks.add(name)
        assert not query.startswith(target_dir)
        assert not any(s.startswith(target_dir) for s in supports)
    assert seen_tasks == {"alpha", "beta"}
    assert len(datamodule.train_data) == 12  # one episode per training normal
    for batch in datamodule.train_dataloader():
        assert isinstance(batch, EpisodeBatch)
        assert "gamma" not in batch.task
        assert batch.support.shape[:2] == (batch.image.shape[0], 2)
    # test / validation: only the target
    assert all(p.startswith(target_dir) for p in datamodule.test_data.samples.image_path)
    assert all(p.startswith(target_dir) for p in datamodule.val_data.samples.image_path)
    assert len(datamodule.test_data) == 4
    supports = datamodule.support_paths()
    assert all(p.startswith(str(root / "gamma" / "train" / "good")) for p in supports)
    images = datamodule.support_images()
    assert images.shape == (2, 3, 64, 64)
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


def test_test_batches_have_labels_and_masks(root: Path) -> None:
    datamodule = FewShotTasks(root=root, target="alpha", k_shot=2, eval_batch_size=8)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_label.tolist().count(True) == 2
    assert batch.gt_mask.shape == (4, 32, 32)
    assert datamodule.task.value == "segmentation"
    assert datamodule.category == "alpha"


def test_one_class_mode_trains_on_k_target_normals(root: Path) -> None:
    datamodule = FewShotTasks(root=root, target="beta", k_shot=3, mode="one_class", support_seed=3)
    datamodule.setup()
    paths = list(datamodule.train_data.samples.image_path)
    assert len(paths) == 3
    assert sorted(paths) == sorted(datamodule.support_paths("beta"))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (3, 3, 48, 48)
    assert all(label == 0 for label in batch.gt_label.tolist())


def test_tasks_as_name_path_pairs(root: Path, tmp_path: Path) -> None:
    datamodule = FewShotTasks(
        root=tmp_path, target="b", k_shot=2, tasks=[["a", str(root / "alpha")], ["b", str(root / "beta")]]
    )
    datamodule.setup()
    assert datamodule.train_task_names == ["a"]
    assert all("alpha" in p for _, q, s in episodes(datamodule) for p in [q, *s])


def test_errors_k_too_large(root: Path) -> None:
    datamodule = FewShotTasks(root=root, target="beta", k_shot=6)
    with pytest.raises(FewShotDataError, match=r"k_shot=6 is too large for training task 'alpha'.*alpha"):
        datamodule.setup()
    datamodule = FewShotTasks(root=root, target="beta", k_shot=7, mode="one_class")
    with pytest.raises(FewShotDataError, match=r"k_shot=7 is larger than the 6 normal images of task 'beta'"):
        datamodule.setup()


def test_errors_no_normals_and_missing_folders(root: Path, tmp_path: Path) -> None:
    for image in (root / "beta" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(FewShotDataError, match=r"Task 'beta' has no normal images: .*beta/train/good"):
        FewShotTasks(root=root, target="alpha").setup()
    (root / "beta" / "train" / "good").rmdir()
    with pytest.raises(FewShotDataError, match=r"Task 'beta': missing normal image folder .*beta/train/good"):
        FewShotTasks(root=root, target="alpha").setup()
    with pytest.raises(FewShotDataError, match=r"Task 'zeta': folder .*zeta does not exist"):
        FewShotTasks(root=root, target="alpha", tasks=["alpha", "zeta"]).setup()
    with pytest.raises(FewShotDataError, match=r"Few-shot root folder .*nowhere does not exist"):
        FewShotTasks(root=tmp_path / "nowhere", target="alpha").setup()
    with pytest.raises(FewShotDataError, match=r"Target task 'omega' is not among"):
        FewShotTasks(root=root, target="omega", tasks=["alpha"]).setup()
    (root / "alpha" / "test" / "empty").mkdir()
    with pytest.raises(FewShotDataError, match=r"Task 'alpha': test folder .*alpha/test/empty is empty"):
        FewShotTasks(root=root, target="alpha", tasks=["alpha", "gamma"]).setup()


def test_errors_mixed_sizes_and_channels(root: Path) -> None:
    odd = root / "alpha" / "train" / "good" / "999.png"
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(odd)
    with pytest.raises(FewShotDataError, match=r"Task 'alpha' mixes image sizes: .*alpha/train/good/999.png"):
        FewShotTasks(root=root, target="beta").setup()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(odd)  # gray among RGB
    with pytest.raises(
        FewShotDataError, match=r"Task 'alpha' mixes image channels: .*999.png is 32x32 with 1"
    ):
        FewShotTasks(root=root, target="beta").setup()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        FewShotTasks(target="a", mode="meta")
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        FewShotTasks(target="a", k_shot=0)
    with pytest.raises(ValueError, match="val_split_mode"):
        FewShotTasks(target="a", val_split_mode="synthetic")
