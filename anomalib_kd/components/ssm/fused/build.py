"""Build the fused selective-scan extension on first use, into a per-machine cache.

Installation never needs a compiler: the C++ source ships in the package, and the first call to
:func:`extension_path` compiles it with the machine's ``g++`` (``$CXX``) against the headers and libraries
of the installed ``openvino`` wheel, with ``-O3 -march=native`` (safe: the library is only ever loaded
on the machine that built it). The result is cached under
``$ANOMALIB_KD_CACHE_DIR`` (default ``~/.cache/anomalib_kd``) ``/fused_scan/<key>/``, the key hashing the
source, the OpenVINO version, the compiler version and the CPU's flags, so an upgrade, a new compiler
or another CPU builds afresh. When building or loading fails (no compiler, no headers, another
OpenVINO layout), or ``ANOMALIB_KD_FUSED_SCAN=0``, :func:`extension_path` returns ``None`` after ONE
warning log line, and callers keep the pure-operation scan.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("selective_scan_op.cpp")
LIBRARY_NAME = "libanomalib_kd_fused_scan.so"
CXX_FLAGS = ["-std=c++17", "-O3", "-march=native", "-shared", "-fPIC", "-fvisibility=hidden"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "path": Path | None once decided, "reason": why not, "build_s": seconds


def cache_root() -> Path:
    """``$ANOMALIB_KD_CACHE_DIR``, else ``$XDG_CACHE_HOME/anomalib_kd``, else ``~/.cache/anomalib_kd``."""
    if os.environ.get("ANOMALIB_KD_CACHE_DIR"):
        return Path(os.environ["ANOMALIB_KD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anomalib_kd"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _openvino_layout() -> tuple[str, Path, Path]:
    """OpenVINO's version, include dir and library dir (the pip wheel's layout)."""
    import openvino as ov

    root = Path(ov.__file__).parent
    include, libs = root / "include", root / "libs"
    if not (include / "openvino" / "op" / "op.hpp").is_file():
        msg = f"no OpenVINO C++ headers under {include}"
        raise FileNotFoundError(msg)
    return ov.__version__, include, libs


def _find_lib(libs: Path, stem: str) -> str:
    """``-l:`` argument for ``libs/<stem>.so*`` (the wheel has versioned names like libopenvino.so.2641)."""
    found = sorted(p.name for p in libs.glob(stem + ".so*"))
    if not found:
        msg = f"{stem}.so not found in {libs}"
        raise FileNotFoundError(msg)
    return "-l:" + found[0]


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        msg = f"C++ compiler {cxx!r} not found (set $CXX)"
        raise FileNotFoundError(msg)
    return cxx


def build_key(cxx: str, ov_version: str) -> str:
    """Cache key: source, OpenVINO version, compiler version, CPU flags and compile flags."""
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), ov_version.encode(), version.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(" ".join(CXX_FLAGS).encode())
    return digest.hexdigest()[:16]


def compile_extension() -> Path:
    """Compile (or find in the cache) the extension library; raises on any failure."""
    cxx = _compiler()
    ov_version, include, libs = _openvino_layout()
    target = cache_root() / "fused_scan" / build_key(cxx, ov_version) / LIBRARY_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        libraries = [_find_lib(libs, s) for s in ("libopenvino", "libopenvino_onnx_frontend", "libtbb")]
        # Build next to the target and rename: concurrent first uses never see a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [cxx, *CXX_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp, f"-L{libs}", *libraries,
                   f"-Wl,-rpath,{libs}"]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
        if result.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            msg = f"{cxx} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
            raise RuntimeError(msg)
        os.replace(tmp, target)
        _state["build_s"] = time.perf_counter() - start
        logger.info("Built the fused selective scan in %.1f s: %s", _state["build_s"], target)
    lib = ctypes.CDLL(str(target))  # loads (and so checks) the library and its OpenVINO dependencies
    lib.akd_simd_width.restype = ctypes.c_int
    lib.akd_simd_width()
    return target


def extension_path() -> Path | None:
    """The extension library, built on first use; ``None`` (after one log line) when unavailable."""
    with _lock:
        if "path" not in _state:
            if os.environ.get("ANOMALIB_KD_FUSED_SCAN", "1") == "0":
                path, reason = None, "disabled by ANOMALIB_KD_FUSED_SCAN=0"
            else:
                try:
                    path, reason = compile_extension(), ""
                except Exception as exc:  # any failure means: use the portable scan
                    path, reason = None, f"{type(exc).__name__}: {exc}".replace("\n", " ")
            _state["path"], _state["reason"] = path, reason
            if path is None:
                logger.warning(
                    "Fused selective scan unavailable (%s); using the pure-operation scan.", reason
                )
        return _state["path"]  # type: ignore[return-value]


def unavailable_reason() -> str:
    """Why :func:`extension_path` gave ``None`` ("" when it did not, or was not called yet)."""
    return str(_state.get("reason", ""))


def reset() -> None:
    """Forget the decision of :func:`extension_path` (tests; after installing a compiler)."""
    with _lock:
        _state.clear()
