"""The allocator trace tracker (tracker.cpp), compiled on first use and cached.

Design. c10's CUDA caching allocator calls every attached trace tracker
(`attachAllocatorTraceTracker`) with each trace entry, as it happens, under the
allocator's lock, whether or not torch's own memory history records. The tracker
appends the entry to column buffers (time, action, address, size, stream) with the
allocating thread's label id (set by module hooks: an int, not a string per call),
its Python stack and autograd's sequence numbers. A drain swaps the buffers under a
mutex and hands them over as numpy arrays; Python turns them into Arrow columns.
Nothing is converted per entry in Python, no snapshot is taken per drain, and
torch's history stays off. Segment entries (segment_alloc/free/map/unmap) are kept
like any other, so the segment map at any point is the start map replayed.

Why frames are read without the GIL: the allocator calls us from inside an op, with
the GIL released; taking it for each allocation would serialise kernel launches on
it (and could deadlock against a thread that holds the GIL and waits on the
allocator's lock). The allocating thread is inside a C call, so its interpreter
frames cannot change while we read them: we follow them from its thread state,
copy file and function names as text from the strings' canonical buffers, and
touch no reference count. A backward allocation runs on autograd's thread, which
has no Python frames: it gets the stack of the forward op whose node is being run,
found by the node's sequence number.

On CPU (start_cpu; profiler/capture/native_cpu.py) the same columns are fed by c10's
default CPU allocator, which reports each allocation and free to the memory reporter
in the thread's profiler slot: the tracker puts its own there on the capturing thread.
Only the variant built without CUDA (VRAMSCOPE_NO_CUDA) is loaded for that.

Limits: frames are read on Python 3.11 to 3.13 only (the interpreter frame layout
is private and changes between versions; elsewhere the variant without frames is
built, and a capture that wants stacks falls back to torch's history); at most 64
innermost frames per stack; forward ops are remembered for their backward in a ring
of 65,536 sequence numbers, so a backward node made more than 65,536 ops before it
runs gets no stack; labels are interned for the process's life, except the markers',
which are forgotten once drained.

Built with the system's C++ compiler straight against torch's headers and
libraries (no ninja, no nvcc): one shared object per source, flags, Python and
torch version, kept under $VRAMSCOPE_EXT_DIR or ~/.cache/vramscope/ext. The
variant that reads Python frames is tried first, then one without. `load()` never
raises: it returns the module or the reason there is none, and the capture falls
back to torch's own memory history on CUDA, to the dispatch mode over tensor storages
on CPU (meta.json's capture_path and capture_path_error).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

_SOURCE = Path(__file__).with_name("tracker.cpp")
_BUILD_TIMEOUT_S = 300
_loaded: dict[bool, tuple[object | None, str | None]] = {}  # cuda -> (module, error)
last_build_s: float | None = None  # seconds the last compile took (None: loaded from cache)


def _cache_dir() -> Path:
    root = os.environ.get("VRAMSCOPE_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vramscope", "ext"
    )
    return Path(root)


def cuda_include_dirs() -> list[str]:
    """Where CUDA's runtime headers are: a CUDA toolkit, or the nvidia-* wheels torch depends
    on (whose runtime wheel lacks crt/, which the nvcc or crt wheels, or triton, may bring)."""
    roots = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    found = [os.path.join(r, "include") for r in roots if r]
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
        found += glob.glob(os.path.join(entry, "triton", "backends", "nvidia", "include"))
    found = [d for d in dict.fromkeys(found) if os.path.isdir(d)]
    runtime = [d for d in found if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))]
    crt = [d for d in found if os.path.exists(os.path.join(d, "crt", "host_defines.h"))]
    complete = [d for d in runtime if d in crt]
    if complete:
        return complete[:1]
    return runtime[:1] + crt[:1] if runtime and crt else []


def _command(cuda: bool, frames: bool, name: str, out: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    cmd = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SOURCE), "-o", str(out)]
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if frames:
        cmd.append("-DVRAMSCOPE_FRAMES")
    if not cuda:
        cmd.append("-DVRAMSCOPE_NO_CUDA")
    if os.environ.get("VRAMSCOPE_TIME_PARTS") == "1":  # bench/tracker_costs.py's timed build
        cmd.append("-DVRAMSCOPE_TIME_PARTS")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    if cuda:
        cuda_dirs = cuda_include_dirs()
        if not cuda_dirs:
            raise FileNotFoundError(
                "no CUDA headers (cuda_runtime_api.h and crt/host_defines.h): no CUDA toolkit, "
                "no nvidia-cuda-runtime with nvidia-cuda-nvcc or nvidia-cuda-crt headers"
            )
        includes += cuda_dirs
    cmd += [f"-I{d}" for d in includes]
    cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    if cuda:
        cmd.append("-lc10_cuda")
    return cmd


def _key(cmd: list[str]) -> str:
    import torch

    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join(cmd[6:]).encode())  # the flags, not the output path
    h.update(f"{sys.version}|{torch.__version__}".encode())
    return h.hexdigest()[:16]


def _build(cuda: bool, frames: bool):
    global last_build_s
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise FileNotFoundError("no C++ compiler (c++) on PATH")
    probe = _command(cuda, frames, "x", Path("x"))
    name = f"vramscope_tracker_{_key(probe)}"
    module, seconds = build_and_load(_command(cuda, frames, name, Path("x")), name)
    if seconds is not None:
        last_build_s = seconds
    return module


def build_and_load(cmd: list[str], name: str, timeout_s: float = _BUILD_TIMEOUT_S) -> tuple[object, float | None]:
    """(module `name`, seconds its compile took or None if cached): compiled by `cmd` (whose -o
    argument is replaced) into the cache folder unless there already, then imported."""
    ext_dir = _cache_dir()
    ext_dir.mkdir(parents=True, exist_ok=True)
    so = ext_dir / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    seconds = None
    if not so.exists():
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        cmd = list(cmd)
        cmd[cmd.index("-o") + 1] = str(tmp)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RuntimeError(f"compile failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(tmp, so)  # another process building the same file wins or loses whole
        seconds = time.perf_counter() - t0
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, seconds


def load(cuda: bool = True) -> tuple[object | None, str | None]:
    """(the tracker module, None) or (None, why it could not be built); cached per process."""
    if cuda in _loaded:
        return _loaded[cuda]
    errors = []
    result: tuple[object | None, str | None] = (None, None)
    for frames in (True, False):
        try:
            result = (_build(cuda, frames), None)
            break
        except Exception as e:  # any failure: try the next variant, then fall back
            errors.append(f"{'frames' if frames else 'no frames'}: {type(e).__name__}: {e}")
    if result[0] is None:
        result = (None, " | ".join(errors))
    _loaded[cuda] = result
    return result
