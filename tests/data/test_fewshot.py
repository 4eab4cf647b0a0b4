"""Few-shot episodic datamodule: sampling, leave-one-out, k-shot one-class mode, errors."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_kd.data.fewshot import EpisodeBatch, FewShotDataError, FewShotTasks, largest_shape
from anomalib_kd.data.image import ImageReadError

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


def test_fixed_supports_do_not_change_between_reads(root: Path) -> None:
    """resample_supports=False: every read of an episode gives the supports drawn at setup."""
    datamodule = FewShotTasks(root=root, target="beta", k_shot=3, support_seed=7)
    datamodule.setup()
    data = datamodule.train_data
    for index, (name, _, drawn) in enumerate(data.episodes):
        expected = [data.tasks[name].normals[i] for i in drawn]
        for seed in range(4):  # whatever torch's global RNG holds (resampling would use it)
            torch.manual_seed(seed)
            assert data[index].support_paths == expected


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


def test_mixed_sizes_and_gray_rgb_in_one_task_are_resized_and_converted(root: Path) -> None:
    """As anomalib: every image read as RGB, sizes resized to the largest when a batch mixes them."""
    normals = root / "alpha" / "train" / "good"
    Image.fromarray(np.full((40, 32, 3), 200, np.uint8)).save(normals / "900.png")  # taller, RGB
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(normals / "901.png")  # gray
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(root / "alpha" / "test" / "good" / "902.png")
    datamodule = FewShotTasks(root=root, target="beta", tasks=["alpha", "beta"], k_shot=7, train_batch_size=3)
    datamodule.setup()  # today: FewShotDataError "mixes image sizes"
    for index in range(len(datamodule.train_data)):
        item = datamodule.train_data[index]
        if item.task == "alpha":  # 8 normals, K=7: the odd images are in every alpha episode
            assert item.image.shape == (3, 40, 32)
            assert item.support.shape == (7, 3, 40, 32)
    batches = list(datamodule.train_dataloader())
    assert sum(batch.batch_size for batch in batches) == len(datamodule.train_data)
    # the target (one_class and test) mixes sizes too: anomalib's dataset/collate handle it
    one_class = FewShotTasks(root=root, target="alpha", k_shot=8, mode="one_class", eval_batch_size=8)
    one_class.setup()
    supports = one_class.support_images()  # all 8 normals of alpha
    gray = supports[one_class.support_paths().index(str(normals / "901.png"))]
    assert supports.shape == (8, 3, 40, 32)
    assert torch.equal(gray[0], gray[2])  # gray repeated to RGB
    assert gray.mean() == pytest.approx(90 / 255, abs=1e-3)
    assert next(iter(one_class.train_dataloader())).image.shape == (8, 3, 40, 32)
    assert next(iter(one_class.test_dataloader())).image.shape[1:] == (3, 32, 32)
    assert largest_shape([(32, 32), (20, 24), (30, 40)]) == (30, 40)  # anomalib: the largest side wins


def write_ct_tasks(root: Path) -> tuple[Path, np.ndarray]:
    """Two tasks of 16-bit CT-like PNGs (raw values 1000..3000); returns the root and one raw image."""
    rng = np.random.default_rng(0)
    for task in ("ct", "mri"):
        for sub in ("train/good", "test/good", "test/bad"):
            (root / task / sub).mkdir(parents=True)
            for i in range(4):
                raw = rng.integers(1000, 3001, (16, 16)).astype(np.uint16)
                cv2.imwrite(str(root / task / sub / f"{i:03d}.png"), raw)
    return root, cv2.imread(str(root / "ct" / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)


def test_16bit_images_keep_their_full_range(tmp_path: Path) -> None:
    root, _ = write_ct_tasks(tmp_path / "tasks")
    datamodule = FewShotTasks(root=root, target="ct", k_shot=2, mode="one_class", eval_batch_size=12)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))  # today: every pixel 1.0 (clipped)
    for image, path in zip(batch.image, batch.image_path, strict=True):
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float32)
        torch.testing.assert_close(image[1], torch.from_numpy(raw / 65535), atol=1e-7, rtol=0)
    supports = datamodule.support_images()
    assert 1000 / 65535 - 1e-6 <= float(supports.min()) < float(supports.max()) <= 3000 / 65535 + 1e-6
    test = next(iter(datamodule.test_dataloader()))
    assert float(test.image.max()) < 0.05
    # a fixed CT window maps the raw range onto [0, 1], in every part of the datamodule
    windowed = FewShotTasks(root=root, target="ct", k_shot=2, window=(1000, 3000), support_seed=1)
    windowed.setup()
    episode = windowed.train_data[0]
    raw = cv2.imread(episode.image_path, cv2.IMREAD_UNCHANGED).astype(np.float32)
    torch.testing.assert_close(episode.image[0], torch.from_numpy((raw - 1000) / 2000), atol=1e-6, rtol=0)
    assert float(windowed.support_images().max()) > 0.9
    test = next(iter(windowed.test_dataloader()))
    assert float(test.image.min()) < 0.1
    assert float(test.image.max()) > 0.9


def test_unreadable_images_name_the_file(root: Path) -> None:
    empty = root / "alpha" / "train" / "good" / "000.png"
    empty.write_bytes(b"")
    with pytest.raises(
        FewShotDataError, match=r"Task 'alpha': .*alpha/train/good/000.png.*empty \(0 bytes\)"
    ):
        FewShotTasks(root=root, target="beta").setup()
    # truncated: the header reads, the pixels do not; the read names the file (today: no name)
    truncated = root / "beta" / "test" / "bad" / "001.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    datamodule = FewShotTasks(root=root, target="beta", tasks=["beta", "gamma"], k_shot=2, eval_batch_size=8)
    datamodule.setup()
    with pytest.raises(ImageReadError, match=re.escape(str(truncated)) + ".*truncated"):
        list(datamodule.test_dataloader())


def test_root_is_required() -> None:
    with pytest.raises(FewShotDataError, match=r"FewShotTasks needs root.*--data.root"):
        FewShotTasks(root=None, target="brick")
    with pytest.raises(TypeError, match="root"):
        FewShotTasks(target="brick")  # type: ignore[call-arg]


def test_bad_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        FewShotTasks(root=root, target="a", mode="meta")
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        FewShotTasks(root=root, target="a", k_shot=0)
    with pytest.raises(ValueError, match="val_split_mode"):
        FewShotTasks(root=root, target="a", val_split_mode="synthetic")
    with pytest.raises(ValueError, match="window"):
        FewShotTasks(root=root, target="a", window="auto")
