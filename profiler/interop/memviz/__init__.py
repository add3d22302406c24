"""To and from torch's memory snapshot: the pickle of `torch.cuda.memory._dump_snapshot`.

stream reads a snapshot pickle without building its objects (pickle_scan.cpp), or else
load, with the standard unpickler, both without running code; rewind rebuilds the allocator
state at the start of its history; to_trace writes a vramscope trace from it
(`vramscope import`); to_snapshot writes a run back as a snapshot that
https://pytorch.org/memory_viz reads (`vramscope export`).
"""

from profiler.interop.memviz.load import check_snapshot, load_snapshot, pick_device
from profiler.interop.memviz.rewind import Rewind
from profiler.interop.memviz.to_snapshot import export_memory_viz, snapshot_of
from profiler.interop.memviz.to_trace import import_snapshot, tag_of
from profiler.trace.tags import parse_tag

__all__ = [
    "load_snapshot",
    "check_snapshot",
    "pick_device",
    "import_snapshot",
    "snapshot_of",
    "export_memory_viz",
    "tag_of",
    "Rewind",
    "parse_tag",
]
