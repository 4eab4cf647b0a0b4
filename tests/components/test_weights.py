"""Pretrained weights: local lookups, the standard download of each source, offline switches, old names.

Nothing here reaches the network: caches are built in ``tmp_path`` and every transport (timm's hub
download, anomalib's ``urlretrieve``, this package's ``fetch_url``) is replaced by a local copy or by a
function that fails the test when called.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from anomalib.data.utils.download import DownloadInfo
from anomalib.models.image.efficient_ad.lightning_model import WEIGHTS_DOWNLOAD_INFO
from safetensors.torch import save_file

import anomalib_kd.components.weights as weights_module
import anomalib_kd.models.dhkd.teacher as teacher_module
from anomalib_kd.components.backbones import create_feature_extractor, load_pretrained_backbone
from anomalib_kd.components.ssm import vmamba as vmamba_module
from anomalib_kd.components.ssm.vmamba import VMambaTiny, load_pretrained_vmamba
from anomalib_kd.components.weights import (
    ChecksumError,
    MissingWeightsError,
    download_file,
    load_weights_into,
    read_state_dict,
)
from anomalib_kd.models.dhkd.teacher import build_teacher, load_teacher_weights

HUB_BACKBONE = "resnet18.a1_in1k"
HUB_REPO = "timm/resnet18.a1_in1k"
LAYERS = ("layer1", "layer2")
# The official URLs (spec: pdd_d24fad_official_code.md 1.2.2; anomalib 2.7's EfficientAd).
VMAMBA_URL = "https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth"
EFFICIENTAD_URL = (
    "https://github.com/open-edge-platform/anomalib/releases/download/"
    "efficientad_pretrained_weights/efficientad_pretrained_weights.zip"
)
TINY_VMAMBA = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def _fail(*args: object, **kwargs: object) -> None:
    pytest.fail(f"network fetch attempted: {args} {kwargs}")


@pytest.fixture(autouse=True)
def no_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way out to the network fails the test unless a test installs a local replacement."""
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", _fail)
    monkeypatch.setattr("anomalib.data.utils.download.urlretrieve", _fail)
    monkeypatch.setattr(weights_module, "fetch_url", _fail)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed (the transports stay replaced)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ANOMALIB_KD_OFFLINE", raising=False)


@pytest.fixture
def anomalib_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """anomalib's pre_trained cache under tmp (platformdirs reads XDG_CACHE_HOME at call time)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "anomalib" / "pre_trained"


def _random_resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- ResNet / WideResNet backbones: timm's caches and timm's own download ---------------------------------


def _hub_layout_cache(root: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face hub cache with ``timm/resnet18.a1_in1k``'s model.safetensors (refs/main, snapshot)."""
    repo = root / f"models--{HUB_REPO.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_hub_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _random_resnet(3)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = _hub_layout_cache(tmp_path / "hf" / "hub", source.state_dict())
    extractor = create_feature_extractor(HUB_BACKBONE, LAYERS)
    assert load_pretrained_backbone(extractor, HUB_BACKBONE) == cached
    torch.testing.assert_close(
        extractor.feature_extractor.layer2[0].conv1.weight, source.layer2[0].conv1.weight
    )


def test_timm_downloads_from_the_hub_when_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    """No local file: timm's own pretrained loading runs, asking the hub for the model's repository."""
    source = _random_resnet(4)
    served = tmp_path / "served.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(served))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    requests: list[tuple[str, str, object]] = []

    def fake_hub_download(
        repo_id: str, filename: str, revision: object = None, cache_dir: object = None
    ) -> str:
        requests.append((repo_id, filename, cache_dir))
        if filename != "model.safetensors":
            pytest.fail(f"unexpected file {filename}")
        return str(served)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_hub_download)
    extractor = create_feature_extractor(HUB_BACKBONE, LAYERS)
    load_pretrained_backbone(extractor, HUB_BACKBONE)
    assert requests == [(HUB_REPO, "model.safetensors", tmp_path / "hub_cache")]
    torch.testing.assert_close(extractor.feature_extractor.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "ANOMALIB_KD_OFFLINE"])
def test_offline_switch_gives_the_clear_error_without_fetching(
    switch: str, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(switch, "1")
    with pytest.raises(MissingWeightsError) as error:
        load_pretrained_backbone(create_feature_extractor(HUB_BACKBONE, LAYERS), HUB_BACKBONE)
    message = str(error.value)
    for needle in (HUB_BACKBONE, "resnet18_a1_0-d63eafa0.pth", "weights_path", "ANOMALIB_KD_WEIGHTS", switch):
        assert needle in message


def test_failed_timm_download_is_the_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    def unreachable(*args: object, **kwargs: object) -> str:
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", unreachable)
    with pytest.raises(MissingWeightsError, match=r"no route to huggingface\.co") as error:
        load_pretrained_backbone(create_feature_extractor(HUB_BACKBONE, LAYERS), HUB_BACKBONE)
    assert "ANOMALIB_KD_WEIGHTS" in str(error.value)


def test_missing_explicit_file_is_never_replaced_by_a_download(tmp_path: Path, online: None) -> None:
    with pytest.raises(MissingWeightsError, match="not found"):
        load_pretrained_backbone(
            create_feature_extractor(HUB_BACKBONE, LAYERS), HUB_BACKBONE, tmp_path / "typo.pth"
        )


# --- timm's state-dict reader -----------------------------------------------------------------------


def test_read_state_dict_unwraps_checkpoints_and_names_mismatches(tmp_path: Path) -> None:
    source = _random_resnet(5)
    nested = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, nested)
    extractor = create_feature_extractor("resnet18", LAYERS)
    load_weights_into(extractor.feature_extractor, read_state_dict(nested), str(nested))
    torch.testing.assert_close(extractor.feature_extractor.conv1.weight, source.conv1.weight)

    bad = {**source.state_dict(), "layer1.0.conv1.weight": torch.zeros(1)}
    bad.pop("bn1.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError) as error:
        load_pretrained_backbone(extractor, "resnet18", tmp_path / "bad.pth")
    for needle in (str(tmp_path / "bad.pth"), "bn1.bias", "layer1.0.conv1.weight"):
        assert needle in str(error.value)


def test_read_state_dict_reads_training_checkpoints_without_importing_their_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like VMamba's release file: a pickled config class (yacs) that is not installed here."""
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "fake_yacs_cfg.py").write_text(
        "class CfgNode(dict):\n    def __init__(self, *a, **k):\n        super().__init__(*a, **k)\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    import fake_yacs_cfg

    config = fake_yacs_cfg.CfgNode(MODEL=fake_yacs_cfg.CfgNode(NAME="vssm"))
    torch.save({"model": {"w": torch.arange(3.0)}, "config": config}, tmp_path / "train.pth")
    monkeypatch.delitem(sys.modules, "fake_yacs_cfg")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(module_dir)])
    with pytest.raises(ModuleNotFoundError):
        import fake_yacs_cfg  # the config's module is really gone
    state = read_state_dict(tmp_path / "train.pth")
    assert list(state) == ["w"]
    torch.testing.assert_close(state["w"], torch.arange(3.0))


# --- DHKD's PDN-medium teacher: anomalib's cache and anomalib's download ---------------------------------


def _teacher_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_teacher(out_channels=8).state_dict()


def test_teacher_is_read_from_anomalibs_cache(anomalib_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = anomalib_cache / "efficientad_pretrained_weights"
    folder.mkdir(parents=True)
    state = _teacher_state(1)
    torch.save(state, folder / "pretrained_teacher_medium.pth")
    teacher = build_teacher(out_channels=8)
    assert load_teacher_weights(teacher) == folder / "pretrained_teacher_medium.pth"
    torch.testing.assert_close(teacher.conv4.weight, state["conv4.weight"])


def _efficientad_zip(path: Path, state: dict[str, torch.Tensor]) -> Path:
    staging = path.parent / "zip_src"
    (staging / "efficientad_pretrained_weights").mkdir(parents=True)
    torch.save(state, staging / "efficientad_pretrained_weights" / "pretrained_teacher_medium.pth")
    with zipfile.ZipFile(path, "w") as archive:
        for file in (staging / "efficientad_pretrained_weights").iterdir():
            archive.write(file, f"efficientad_pretrained_weights/{file.name}")
    return path


def _serve(source: Path, requested: list[str]) -> Callable[..., None]:
    def fake_urlretrieve(url: str, filename: Path, reporthook: object = None) -> None:
        requested.append(url)
        shutil.copyfile(source, filename)

    return fake_urlretrieve


def test_teacher_download_uses_anomalibs_url_helper_and_checksum(
    tmp_path: Path, anomalib_cache: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    state = _teacher_state(2)
    archive = _efficientad_zip(tmp_path / "served.zip", state)
    requested: list[str] = []
    monkeypatch.setattr("anomalib.data.utils.download.urlretrieve", _serve(archive, requested))
    # anomalib's URL, with the checksum of the local stand-in archive.
    info = DownloadInfo(WEIGHTS_DOWNLOAD_INFO.name, WEIGHTS_DOWNLOAD_INFO.url, _sha256(archive))
    monkeypatch.setattr(teacher_module, "TEACHER_DOWNLOAD_INFO", info)
    teacher = build_teacher(out_channels=8)
    path = load_teacher_weights(teacher)
    assert requested == [EFFICIENTAD_URL]
    assert path == anomalib_cache / "efficientad_pretrained_weights" / "pretrained_teacher_medium.pth"
    assert sorted(p.name for p in anomalib_cache.iterdir()) == ["efficientad_pretrained_weights"]
    torch.testing.assert_close(teacher.conv1.weight, state["conv1.weight"])


def test_teacher_download_with_wrong_checksum_is_refused_and_nothing_kept(
    tmp_path: Path, anomalib_cache: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    archive = _efficientad_zip(tmp_path / "served.zip", _teacher_state(3))
    requested: list[str] = []
    monkeypatch.setattr("anomalib.data.utils.download.urlretrieve", _serve(archive, requested))
    with pytest.raises(ChecksumError, match=WEIGHTS_DOWNLOAD_INFO.hashsum) as error:
        load_teacher_weights(build_teacher(out_channels=8))  # anomalib's real checksum: a mismatch
    assert EFFICIENTAD_URL in str(error.value)
    assert requested == [EFFICIENTAD_URL]
    assert list(anomalib_cache.iterdir()) == []


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "ANOMALIB_KD_OFFLINE"])
def test_teacher_offline_gives_the_clear_error_without_fetching(
    switch: str, anomalib_cache: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    monkeypatch.setenv(switch, "1")
    with pytest.raises(MissingWeightsError) as error:
        load_teacher_weights(build_teacher(out_channels=8))
    for needle in (
        "pretrained_teacher_medium.pth",
        "weights_path",
        "ANOMALIB_KD_WEIGHTS",
        switch,
        "distill_pdn",
    ):
        assert needle in str(error.value)


# --- PDD's VMamba-Tiny: the official release file -----------------------------------------------------


def _vmamba_file(path: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) for k, v in VMambaTiny(**TINY_VMAMBA).state_dict().items()}
    torch.save({"model": state, "epoch": 292}, path)
    return path, state


def test_vmamba_download_official_url_verified_by_strict_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served, state = _vmamba_file(tmp_path / "served.pth", 1)
    requested: list[str] = []

    def fake_fetch(url: str, destination: Path, description: str) -> None:
        requested.append(url)
        shutil.copyfile(served, destination)

    monkeypatch.setattr(weights_module, "fetch_url", fake_fetch)
    model = VMambaTiny(**TINY_VMAMBA)
    path = load_pretrained_vmamba(model)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert requested == [VMAMBA_URL]
    assert path == checkpoints / "vssmtiny_dp01_ckpt_epoch_292.pth"
    assert [p.name for p in checkpoints.iterdir()] == ["vssmtiny_dp01_ckpt_epoch_292.pth"]
    torch.testing.assert_close(model.patch_embed[0].weight, state["patch_embed.0.weight"])
    # The cached file is used from now on, without fetching.
    monkeypatch.setattr(weights_module, "fetch_url", _fail)
    assert load_pretrained_vmamba(VMambaTiny(**TINY_VMAMBA)) == path


def test_vmamba_download_that_does_not_load_strictly_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.save({"model": {"patch_embed.0.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    monkeypatch.setattr(
        weights_module,
        "fetch_url",
        lambda url, destination, description: shutil.copyfile(tmp_path / "wrong.pth", destination),
    )
    with pytest.raises(RuntimeError, match="missing keys"):
        load_pretrained_vmamba(VMambaTiny(**TINY_VMAMBA))
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_vmamba_checksum_constant_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    """No checksum is published today; if one is set, a mismatching download is refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served, _ = _vmamba_file(tmp_path / "served.pth", 2)
    monkeypatch.setattr(
        weights_module,
        "fetch_url",
        lambda url, destination, description: shutil.copyfile(served, destination),
    )
    monkeypatch.setattr(vmamba_module, "VMAMBA_TINY_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="0" * 64):
        load_pretrained_vmamba(VMambaTiny(**TINY_VMAMBA))
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "ANOMALIB_KD_OFFLINE"])
def test_vmamba_offline_gives_the_clear_error_without_fetching(
    switch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    monkeypatch.setenv(switch, "1")
    with pytest.raises(MissingWeightsError) as error:
        load_pretrained_vmamba(VMambaTiny(**TINY_VMAMBA))
    for needle in (
        "vssmtiny_dp01_ckpt_epoch_292.pth",
        VMAMBA_URL,
        "vmamba_weights_path",
        "ANOMALIB_KD_WEIGHTS",
        switch,
    ):
        assert needle in str(error.value)


# --- the download step itself ------------------------------------------------------------------------


def test_download_file_checks_the_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    served = tmp_path / "served.bin"
    served.write_bytes(b"weights" * 1000)
    monkeypatch.setattr(
        weights_module,
        "fetch_url",
        lambda url, destination, description: shutil.copyfile(served, destination),
    )
    target = tmp_path / "cache" / "file.bin"
    assert download_file("https://example.org/file.bin", target, sha256=_sha256(served)) == target
    assert target.read_bytes() == served.read_bytes()
    wrong = tmp_path / "cache2" / "file.bin"
    with pytest.raises(ChecksumError, match=re.escape("https://example.org/file.bin")):
        download_file("https://example.org/file.bin", wrong, sha256="f" * 64)
    assert list(wrong.parent.iterdir()) == []


def test_interrupted_download_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None
) -> None:
    def broken_fetch(url: str, destination: Path, description: str) -> None:
        destination.write_bytes(b"half of the fi")
        raise ConnectionResetError("connection reset")

    monkeypatch.setattr(weights_module, "fetch_url", broken_fetch)
    target = tmp_path / "cache" / "file.bin"
    target.parent.mkdir()
    with pytest.raises(ConnectionResetError):
        download_file("https://example.org/file.bin", target)
    assert list(target.parent.iterdir()) == []


# --- nothing at construction; old argument names -----------------------------------------------------


def test_models_touch_no_network_when_built(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online and pre_trained=True, building the four models fetches nothing and loads no weights."""
    from anomalib_kd import D24FAD, DHKD, PDD, URD
    from anomalib_kd.components import backbones

    fetched: list[str] = []
    monkeypatch.setattr(weights_module, "fetch_url", lambda url, *_: fetched.append(url))
    monkeypatch.setattr(backbones, "download_pretrained_state", lambda name: fetched.append(name))
    models = [
        URD(backbone="resnet18", pre_trained=True),
        D24FAD(backbone="resnet18", pre_trained=True),
        DHKD(pre_trained=True, image_size=64),
        PDD(backbone="resnet18", pre_trained=True, vmamba_depths=(1, 1, 1, 1), vmamba_dims=(8, 16, 32, 64)),
    ]
    assert fetched == []
    assert not any(bool(model.model.pretrained_loaded) for model in models)


def test_old_weight_argument_names_still_work(tmp_path: Path) -> None:
    from anomalib_kd import DHKD, PDD

    with pytest.warns(DeprecationWarning, match="teacher_weights"):
        dhkd = DHKD(teacher_weights="teacher.pth", pre_trained=False, image_size=64)
    assert dhkd.weights_path == "teacher.pth"
    small_pdd = {"backbone": "resnet18", "vmamba_depths": (1, 1, 1, 1), "vmamba_dims": (8, 16, 32, 64)}
    with pytest.warns(DeprecationWarning, match="wrn_weights_path"):
        pdd = PDD(wrn_weights_path="wrn.pth", pre_trained=False, **small_pdd)
    assert pdd.weights_path == "wrn.pth"
    with pytest.raises(ValueError, match="pass only weights_path"):
        PDD(weights_path="a.pth", wrn_weights_path="b.pth", **small_pdd)

    # An old checkpoint's hyper-parameters (saved under the old name) restore the same setting.
    checkpoint = {
        "state_dict": dhkd.state_dict(),
        "hyper_parameters": {"teacher_weights": "old_teacher.pth", "pre_trained": True, "image_size": 64},
        "pytorch-lightning_version": "2.5.0",
    }
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(DeprecationWarning, match="teacher_weights"):
        restored = DHKD.load_from_checkpoint(tmp_path / "old.ckpt")
    assert restored.weights_path == "old_teacher.pth"


def test_teacher_download_can_be_refused_by_the_caller(anomalib_cache: Path, online: None) -> None:
    """The benchmark harness (random EfficientAd teacher when no file) passes ``download=False``."""
    with pytest.raises(MissingWeightsError, match="Downloading was not allowed here"):
        load_teacher_weights(build_teacher(out_channels=8), download=False)
