"""Registration into anomalib: the import hook, what is registered, a built wheel's start-up files."""

from __future__ import annotations

import logging
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from anomalib_kd import _registration

from .helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
USER_MODELS = {"URD", "DHKD", "PDD", "D24FAD"}
USER_DATAMODULES = {"Textures", "FewShotTasks", "HighBitDepthFolder", "HighBitDepthMVTecAD"}


class Registered:
    """What the fake entry point points at."""


SEEN: dict[str, object] = {}


def _fake_anomalib_zip(folder: Path) -> Path:
    """``fakeanomalib`` in a zip (anomalib imported from a zip): one zip importer serves every module of
    a folder. ``fakeanomalib.models`` imports its sibling ``fakeanomalib.other`` (same importer) half-way
    through and sets READY last."""
    archive = folder / "fakeanomalib.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("fakeanomalib/__init__.py", "")
        models = "from .. import other\n__all__ = ['other']\nREADY = True\n"
        handle.writestr("fakeanomalib/models/__init__.py", models)
        handle.writestr("fakeanomalib/other.py", "VALUE = 1\n")
    return archive


@pytest.fixture
def fake_anomalib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """The hook, pointed at ``fakeanomalib.models`` (a zip), with a declared class that records the
    state of the module at the moment it is registered."""
    archive = _fake_anomalib_zip(tmp_path)
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.setattr(_registration, "TARGETS", {"fakeanomalib.models": "fake.group"})
    monkeypatch.setattr(_registration, "_registered", set())
    SEEN.clear()

    def declared(group: str) -> dict[str, str]:
        module = sys.modules["fakeanomalib.models"]
        SEEN["ready_when_registered"] = getattr(module, "READY", False)
        return {"Registered": f"{__name__}:Registered"}

    monkeypatch.setattr(_registration, "declared", declared)
    hook = _registration.RegisterAfterImport()
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    yield hook
    for name in [n for n in sys.modules if n.startswith("fakeanomalib")]:
        del sys.modules[name]


def test_hook_registers_after_the_module_ran_and_leaves_a_shared_loader_alone(fake_anomalib: object) -> None:
    import fakeanomalib.models as models

    assert models.Registered is Registered
    assert SEEN["ready_when_registered"] is True, "registered while anomalib.models was half-imported"
    loader = models.__spec__.loader
    assert type(loader).__name__ == "zipimporter"  # the module keeps its own loader
    assert models.__loader__ is loader
    assert "exec_module" not in vars(loader), "the shared zip importer was mutated"
    assert sys.modules["fakeanomalib.other"].__loader__ is loader  # one importer for both


def test_a_failing_registration_never_breaks_anomalib_import(
    fake_anomalib: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(group: str) -> dict[str, str]:
        raise RuntimeError("entry points unreadable")

    monkeypatch.setattr(_registration, "declared", broken)
    with caplog.at_level(logging.WARNING):
        import fakeanomalib.models as models
    assert models.READY is True
    assert "entry points unreadable" in caplog.text


def test_a_class_that_fails_to_load_is_skipped_with_a_warning(
    fake_anomalib: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"Registered": f"{__name__}:Registered"}
    monkeypatch.setattr(_registration, "declared", lambda group: {"Broken": f"{__name__}:_raises", **good})
    monkeypatch.setattr(_registration, "_load", _load_or_raise)
    with caplog.at_level(logging.WARNING):
        import fakeanomalib.models as models
    assert models.Registered is Registered
    assert not hasattr(models, "Broken")
    assert "could not register Broken" in caplog.text


def _load_or_raise(value: str) -> object:
    if value.endswith(":_raises"):
        raise ValueError("broken class")
    from pkgutil import resolve_name

    return resolve_name(value)


PROBE = """
import anomalib.data as data, anomalib.models as models
from anomalib_kd._registration import declared
print(sorted(declared('anomalib_kd.models')))
print(sorted(declared('anomalib_kd.datamodules')))
print(sorted(n for n in vars(models) if n.startswith('Budgeted')))
print(hasattr(data, 'KDBench'), all(hasattr(models, n) for n in {models}),
      all(hasattr(data, n) for n in {data}))
"""


@pytest.mark.slow
def test_only_the_user_facing_classes_are_registered(tmp_path: Path) -> None:
    """The four models and the user datamodules; none of the benchmark harness (Budgeted*, KDBench)."""
    probe = PROBE.format(models=sorted(USER_MODELS), data=sorted(USER_DATAMODULES))
    lines = run_cli([sys.executable, "-c", probe], cwd=tmp_path).stdout.strip().splitlines()
    assert lines[0] == str(sorted(USER_MODELS))
    assert lines[1] == str(sorted(USER_DATAMODULES))
    assert lines[2] == "[]"
    assert lines[3] == "False True True"


def test_start_file_names_the_autoload_entry_point() -> None:
    """PEP 829: ``<name>.start`` holds ``pkg.mod:callable`` lines and sits beside the matching ``.pth``."""
    from pkgutil import resolve_name

    start = (REPO / "anomalib_kd_autoload.start").read_text().split()
    assert start == ["anomalib_kd._registration:autoload"]
    assert resolve_name(start[0]) is _registration.autoload
    assert (REPO / "anomalib_kd_autoload.pth").read_text().startswith("import anomalib_kd._registration")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip`` builds from this checkout, unpacked into a folder (a site directory)."""
    out = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    run_cli([*command, str(REPO)], cwd=out)
    (wheel,) = out.glob("anomalib_kd-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as handle:
        handle.extractall(site)
        names = set(handle.namelist())
    assert {"anomalib_kd_autoload.pth", "anomalib_kd_autoload.start", "anomalib_kd/py.typed"} <= names
    assert not any(name.startswith("anomalib_kd/benchmark") for name in names), "harness shipped in the wheel"
    assert any(name.endswith("licenses/LICENSE") for name in names)
    return site


SITE_PROBE = """
import sys
sys.path.append({deps!r})  # anomalib & co., without running that folder's start-up files
{startup}
import anomalib.models as models, anomalib_kd
print(anomalib_kd.__file__)
print(models.URD.__module__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("startup", ["pth", "start"])
def test_built_wheel_registers_through_its_startup_file(
    built_wheel: Path, startup: str, tmp_path: Path
) -> None:
    """Only the wheel's own start-up file runs (``python -S``): the ``.pth`` line as site.py runs it
    today, or the ``.start`` entry point as site.py runs it from Python 3.15 (PEP 829)."""
    if startup == "pth":
        run = f"import site; site.addsitedir({str(built_wheel)!r})"
    else:
        entry = (built_wheel / "anomalib_kd_autoload.start").read_text().strip()
        run = f"sys.path.insert(0, {str(built_wheel)!r}); import pkgutil; pkgutil.resolve_name({entry!r})()"
    probe = SITE_PROBE.format(deps=sysconfig.get_paths()["purelib"], startup=run)
    result = run_cli([sys.executable, "-S", "-c", probe], cwd=tmp_path)
    package_file, model_module = result.stdout.strip().splitlines()[-2:]
    assert Path(package_file).is_relative_to(built_wheel)
    assert model_module == "anomalib_kd.models.urd.lightning_model"


@pytest.mark.slow
def test_without_a_startup_file_nothing_is_registered(built_wheel: Path, tmp_path: Path) -> None:
    """The control for the test above: the same interpreter, no start-up file, no URD."""
    startup = f"sys.path.insert(0, {str(built_wheel)!r})"
    probe = SITE_PROBE.format(deps=sysconfig.get_paths()["purelib"], startup=startup)
    probe = probe.replace("import anomalib.models as models, anomalib_kd", "import anomalib.models as models")
    probe = probe.replace("print(anomalib_kd.__file__)\n", "")
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "URD" in result.stderr
