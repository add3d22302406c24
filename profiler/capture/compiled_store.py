"""Line maps of inductor's generated files, kept on disk for later processes.

Inductor's FX-graph cache (on by default) lets a later run of the same script skip
the lowering that a line map is made from: the cached wrapper is written again to the
same file, whose name is the hash of its source. So a map saved under that file's
name serves the same generated code in any later process that uses the same inductor
cache directory, and a model compiled from the cache before a capture began keeps its
layer names in it.

The map is a function of the graph, and the file of its source only: two graphs whose
generated code is identical to the character share one map (the last one saved),
which names the same layers wherever the modules are named alike.

Files: one JSON per generated file under $VRAMSCOPE_MAP_DIR, else
~/.cache/vramscope/compiled_maps; written whole to a temporary file, then renamed.
Any failure leaves the map unsaved or unloaded, never raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from profiler.capture.compiled_lines import LineInfo

_FORMAT = 1
loaded = 0  # maps read from the store in this process


def store_dir() -> Path:
    root = os.environ.get("VRAMSCOPE_MAP_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vramscope" / "compiled_maps"


def save(generated: str, infos: dict[int, LineInfo]) -> None:
    """Keep the map of `generated` (a real path) for later processes."""
    try:
        folder = store_dir()
        folder.mkdir(parents=True, exist_ok=True)
        body = dict(format=_FORMAT, file=generated, lines={str(k): list(v) for k, v in infos.items()})
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, folder / _name(generated))
    except Exception:  # noqa: BLE001 - a map not saved: a later process names less
        return


def load(generated: str) -> dict[int, LineInfo] | None:
    """The saved map of `generated` (a real path), or None."""
    if not _is_generated(generated):
        return None
    try:
        body = json.loads((store_dir() / _name(generated)).read_text())
        if body.get("format") != _FORMAT or body.get("file") != generated:
            return None
        infos = {int(k): LineInfo(str(m), str(p), bool(r)) for k, (m, p, r) in body["lines"].items()}
    except Exception:  # noqa: BLE001 - none saved, or unreadable: unnamed, as without a store
        return None
    global loaded
    loaded += 1
    return infos


def _name(generated: str) -> str:
    return hashlib.sha256(generated.encode()).hexdigest()[:32] + ".json"


def _is_generated(filename: str) -> bool:
    """Whether `filename` lies in inductor's cache directory (other frames never have a map)."""
    global _inductor_dir
    if _inductor_dir is None:
        utils = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
        if utils is None:
            return False
        try:
            _inductor_dir = utils.cache_dir() + os.sep
        except Exception:  # noqa: BLE001
            return False
    return filename.startswith(_inductor_dir)


_inductor_dir: str | None = None  # inductor's cache directory, once inductor is loaded
