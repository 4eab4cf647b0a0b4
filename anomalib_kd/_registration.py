"""Register anomalib-kd's models and datamodules into anomalib, without editing anomalib.

anomalib 2.7 resolves bare names through ``anomalib.models`` (``get_model``, used by ``anomalib
benchmark``) and ``anomalib.data`` (``get_datamodule``), and has no plugin registry. So this package
makes its classes attributes of those two modules as soon as they are imported:

* The wheel installs ``anomalib_kd_autoload.pth`` into site-packages; Python runs it at start-up and
  it calls :func:`autoload`, which only installs a light import hook (no torch, no anomalib).
* When ``anomalib.models`` / ``anomalib.data`` finish importing, the hook loads the classes declared
  in this package's entry-point groups ``anomalib_kd.models`` / ``anomalib_kd.datamodules`` and sets
  them on those modules.
* ``import anomalib_kd`` calls :func:`autoload` too; the ``anomalib-kd`` command registers explicitly.
* ``ANOMALIB_KD_NO_AUTOLOAD=1`` turns the automatic part off (then use ``anomalib-kd`` or import
  ``anomalib_kd`` and call :func:`register_into_anomalib`).

Registration never raises into anomalib's import: a failure is logged as a warning.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.metadata import entry_points
from types import ModuleType

logger = logging.getLogger(__name__)

# anomalib module -> our entry-point group whose classes become its attributes
DISABLE_ENV = "ANOMALIB_KD_NO_AUTOLOAD"
TARGETS = {"anomalib.models": "anomalib_kd.models", "anomalib.data": "anomalib_kd.datamodules"}
_registered: set[str] = set()


def _declared(group: str) -> dict[str, str]:
    """name -> 'module:attr' for the entry points of ``group``, with a fallback for source checkouts."""
    declared = {ep.name: ep.value for ep in entry_points(group=group)}
    return declared or _FALLBACK[group]


# Used when the package runs from a source tree that was never pip-installed (no entry points).
_FALLBACK = {
    "anomalib_kd.models": {
        "URD": "anomalib_kd.models.urd:URD",
        "D24FAD": "anomalib_kd.models.d24fad:D24FAD",
        "DHKD": "anomalib_kd.models.dhkd:DHKD",
        "PDD": "anomalib_kd.models.pdd:PDD",
        "BudgetedURD": "anomalib_kd.benchmark.models:BudgetedURD",
        "BudgetedDHKD": "anomalib_kd.benchmark.models:BudgetedDHKD",
        "BudgetedPDD": "anomalib_kd.benchmark.models:BudgetedPDD",
        "BudgetedD24FAD": "anomalib_kd.benchmark.models:BudgetedD24FAD",
        "BudgetedReverseDistillation": "anomalib_kd.benchmark.models:BudgetedReverseDistillation",
        "BudgetedEfficientAd": "anomalib_kd.benchmark.models:BudgetedEfficientAd",
        "BudgetedPatchcore": "anomalib_kd.benchmark.models:BudgetedPatchcore",
    },
    "anomalib_kd.datamodules": {
        "Textures": "anomalib_kd.data.textures:Textures",
        "FewShotTasks": "anomalib_kd.data.fewshot:FewShotTasks",
        "KDBench": "anomalib_kd.data.kdbench:KDBench",
    },
}


def _load(value: str) -> object:
    module_name, _, attr = value.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def register_into(target: str) -> list[str]:
    """Set our classes on the (fully imported) anomalib module ``target``; returns their names.

    A class whose module is itself still being imported (e.g. the user's first import was
    ``anomalib_kd.data.textures``, which imports ``anomalib.data``) cannot be loaded yet: it is
    resolved on first attribute access through a module ``__getattr__`` (PEP 562) instead.
    """
    if target in _registered:
        return []
    _registered.add(target)
    module = sys.modules[target]
    names, pending = [], {}
    for name, value in _declared(TARGETS[target]).items():
        try:
            setattr(module, name, _load(value))
            names.append(name)
        except (ImportError, AttributeError):  # our module is mid-import: the class isn't defined yet
            pending[name] = value
        except Exception as error:
            logger.warning("anomalib-kd: could not register %s (%s) into %s: %s", name, value, target, error)
    if pending:
        _resolve_on_access(module, pending)
    return names


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
    for target in TARGETS:
        importlib.import_module(target)
        register_into(target)


class _RegisterAfterImport(MetaPathFinder):
    """Finder that lets the normal finders locate ``anomalib.models``/``anomalib.data`` and runs
    :func:`register_into` right after the module's code has executed."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in TARGETS or fullname in _registered:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                original = spec.loader.exec_module

                def exec_module(module: ModuleType, _original=original, _name=fullname) -> None:
                    _original(module)
                    register_into(_name)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


_HOOK = _RegisterAfterImport()


def autoload() -> None:
    """Register now if anomalib is loaded, else hook its import (start-up .pth and package import)."""
    if os.environ.get(DISABLE_ENV, "").lower() in {"1", "true", "yes"}:
        return
    try:
        for target in TARGETS:
            if target in sys.modules and hasattr(sys.modules[target], "__all__"):
                register_into(target)
        if _HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _HOOK)
    except Exception as error:
        logger.warning("anomalib-kd: automatic registration into anomalib failed: %s", error)
