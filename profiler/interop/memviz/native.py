"""The streaming snapshot reader (pickle_scan.cpp), compiled on first use and cached.

Built with the system's C++ compiler against pybind11 (shipped in torch's headers), no torch
library linked: one shared object per source and Python version, kept beside the
capture's tracker under $VRAMSCOPE_EXT_DIR or ~/.cache/vramscope/ext. `load()` never raises:
without a compiler (or torch) it returns None and the reason, and the import reads the
snapshot with the standard unpickler instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

_SOURCES = [Path(__file__).with_name("pickle_scan.cpp"), Path(__file__).with_name("pickle_scan_impl.h")]
_loaded: list[tuple[object | None, str | None]] = []


def _torch_include() -> str:
    """torch's header folder (pybind11 is in it), found without importing torch: importing it
    would cost the import as much memory as a large snapshot's reader."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torch is not installed (its headers bring pybind11)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


def _command(name: str, out: Path) -> list[str]:
    cmd = [
        os.environ.get("CXX", "c++"),
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",
        str(_SOURCES[0]),
        "-o",
        str(out),
    ]
    cmd += [f"-DTORCH_EXTENSION_NAME={name}"]
    cmd += [f"-I{d}" for d in [_torch_include(), sysconfig.get_paths()["include"]]]
    return cmd


def _build():
    from profiler.capture.native import build_and_load  # no torch import: only its cache and compile

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise FileNotFoundError("no C++ compiler (c++) on PATH")
    h = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES))
    h.update(" ".join(_command("x", Path("x"))[6:]).encode())
    h.update(sys.version.encode())
    name = f"vramscope_pickle_scan_{h.hexdigest()[:16]}"
    return build_and_load(_command(name, Path("x")), name)[0]


def load() -> tuple[object | None, str | None]:
    """(the scanner module, None) or (None, why there is none); built once per process."""
    if not _loaded:
        try:
            _loaded.append((_build(), None))
        except Exception as e:  # noqa: BLE001 - any failure means the standard reader
            _loaded.append((None, f"{type(e).__name__}: {e}"))
    return _loaded[0]
