"""Register anomalib-kd's models and datamodules into anomalib, without editing anomalib.

anomalib 2.7 resolves bare names through ``anomalib.models`` (``get_model``, used by ``anomalib
benchmark``) and ``anomalib.data`` (``get_datamodule``), and has no plugin registry. So this package
makes its classes attributes of those two modules as soon as they are imported:

* The wheel installs ``anomalib_kd_autoload.start`` (PEP 829, Python >= 3.15) and, for older
  interpreters, ``anomalib_kd_autoload.pth``; both call :func:`autoload` at start-up, which only puts a
  small finder on ``sys.meta_path`` (standard library only: no torch, no anomalib, no entry-point scan).
* When ``anomalib.models`` / ``anomalib.data`` finish importing, the finder's loader wrapper loads the
  classes declared in this package's entry-point groups ``anomalib_kd.models`` /
  ``anomalib_kd.datamodules`` and sets them on those modules. The module's own loader is wrapped, never
  mutated (a zip importer serves every module of its archive), and is put back on the module afterwards.
* ``import anomalib_kd`` calls :func:`autoload` too; the ``anomalib-kd`` command registers explicitly.
* ``ANOMALIB_KD_NO_AUTOLOAD=1`` turns the automatic part off (then use ``anomalib-kd`` or import
  ``anomalib_kd`` and call :func:`register_into_anomalib`).

Registration never raises into anomalib's import: a failure is logged as a warning.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: this module runs at every interpreter start-up
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

DISABLE_ENV = "ANOMALIB_KD_NO_AUTOLOAD"
# anomalib module -> our entry-point group whose classes become its attributes
TARGETS = {"anomalib.models": "anomalib_kd.models", "anomalib.data": "anomalib_kd.datamodules"}
_registered: set[str] = set()

# Used when the package runs from a source tree that was never pip-installed (no entry points).
_FALLBACK = {
    "anomalib_kd.models": {
        "URD": "anomalib_kd.models.urd:URD",
        "D24FAD": "anomalib_kd.models.d24fad:D24FAD",
        "DHKD": "anomalib_kd.models.dhkd:DHKD",
        "PDD": "anomalib_kd.models.pdd:PDD",
    },
    "anomalib_kd.datamodules": {
        "Textures": "anomalib_kd.data.textures:Textures",
        "FewShotTasks": "anomalib_kd.data.fewshot:FewShotTasks",
        "HighBitDepthFolder": "anomalib_kd.data.high_bit_depth:HighBitDepthFolder",
        "HighBitDepthMVTecAD": "anomalib_kd.data.high_bit_depth:HighBitDepthMVTecAD",
    },
}


def _warn(message: str, *args: object) -> None:
    import logging  # imported on use: start-up stays cheap

    logging.getLogger(__name__).warning(message, *args)


def declared(group: str) -> dict[str, str]:
    """name -> ``'module:attr'`` for the entry points of ``group`` (source checkouts: built-in list)."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=group)}
    return found or dict(_FALLBACK[group])


def _load(value: str) -> object:
    from pkgutil import resolve_name

    return resolve_name(value)


def register_classes(module: ModuleType, classes: dict[str, str]) -> list[str]:
    """Set each ``name -> 'module:attr'`` of ``classes`` on ``module``; returns the names set now.

    A class whose module is itself still being imported (e.g. the user's first import was
    ``anomalib_kd.data.textures``, which imports ``anomalib.data``) cannot be loaded yet: it is
    resolved on first attribute access through a module ``__getattr__`` (PEP 562) instead.
    """
    names, pending = [], {}
    for name, value in classes.items():
        try:
            setattr(module, name, _load(value))
            names.append(name)
        except (ImportError, AttributeError):  # our module is mid-import: the class isn't defined yet
            pending[name] = value
        except Exception as error:
            _warn("anomalib-kd: could not register %s (%s) into %s: %s", name, value, module.__name__, error)
    if pending:
        _resolve_on_access(module, pending)
    return names


def register_into(target: str) -> list[str]:
    """Set our classes on the (fully imported) anomalib module ``target``; returns their names."""
    if target in _registered:
        return []
    _registered.add(target)
    return register_classes(sys.modules[target], declared(TARGETS[target]))


def _resolve_on_access(module: ModuleType, pending: dict[str, str]) -> None:
    """Give ``module`` a ``__getattr__`` that loads the ``pending`` classes when first asked for."""
    previous = module.__dict__.get("__getattr__")

    def __getattr__(name: str) -> object:  # noqa: N807
        if name in pending:
            value = _load(pending.pop(name))
            setattr(module, name, value)
            return value
        if previous is not None:
            return previous(name)
        msg = f"module {module.__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]


def register_into_anomalib() -> None:
    """Import anomalib's model and data modules and register into both (explicit form)."""
    import importlib

    for target in TARGETS:
        importlib.import_module(target)
        register_into(target)


class RegisteringLoader:
    """Wraps the loader of ``anomalib.models`` / ``anomalib.data``: runs it, then registers.

    The wrapped loader is left untouched (it may be shared, e.g. one zip importer for all of anomalib)
    and is restored on the module once its code has run, so the module looks as if never wrapped.
    """

    def __init__(self, loader: object, target: str) -> None:
        self.loader = loader
        self.target = target

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)  # type: ignore[attr-defined]
        finally:
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader  # type: ignore[assignment]
        try:
            register_into(self.target)
        except Exception as error:  # never break anomalib's own import
            _warn("anomalib-kd: registration into %s failed: %s", self.target, error)

    def __getattr__(self, name: str) -> object:  # get_source, get_resource_reader, ... of the real loader
        return getattr(self.loader, name)


class RegisterAfterImport:
    """``sys.meta_path`` finder: lets the other finders locate ``anomalib.models`` / ``anomalib.data``
    and returns their spec with a :class:`RegisteringLoader` around the loader."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in TARGETS or fullname in _registered:
            return None
        try:
            for finder in sys.meta_path:
                if isinstance(finder, RegisterAfterImport) or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is None:
                    continue
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = RegisteringLoader(spec.loader, fullname)  # type: ignore[assignment]
                return spec
        except Exception as error:  # let the normal import machinery try on its own
            _warn("anomalib-kd: import hook for %s failed: %s", fullname, error)
        return None


_HOOK = RegisterAfterImport()


def autoload() -> None:
    """Register now if anomalib is loaded, else hook its import (start-up file and package import)."""
    if os.environ.get(DISABLE_ENV, "").lower() in {"1", "true", "yes"}:
        return
    try:
        for target in TARGETS:
            if target in sys.modules and hasattr(sys.modules[target], "__all__"):
                register_into(target)
        if not any(isinstance(finder, RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _HOOK)
    except Exception as error:
        _warn("anomalib-kd: automatic registration into anomalib failed: %s", error)
