"""FSDP2 (fully_shard) buffers, named where FSDP makes them.

FSDP2 allocates in three places of its parameter groups, and each gets the
category of what it makes:

- `unshard`: the all-gather's input (this rank's shards, cast to the compute
  dtype) and output (every rank's shards): all_gather;
- `wait_for_unshard`: the copy-out into each parameter's full tensor:
  unsharded_parameter;
- `post_backward`: the reduce-scatter's input (and a cast to the reduce dtype):
  reduce_scatter. Its output becomes the sharded gradient, which the gradient
  role at the next optimizer step names (roles override these hints).

The full gradients that autograd made for the unsharded parameters are named
as a role (unsharded_gradient) when post_backward starts, the last moment they
are all alive. Sharded parameters, sharded gradients and optimizer states are
DTensors whose local tensors carry the usual roles (profiler/capture/roles.py).

The patches are on FSDPParamGroup's class, installed for the capture only.
FSDP2 is found lazily: a script that never imports it pays nothing. The capture
is given, not imported: its `category(name)` context, `position()`,
`register_roles(...)` and `step_index` are all this module uses, with the tags
of its backend.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

from profiler.capture import api
from profiler.trace.schema import Category

if TYPE_CHECKING:
    from profiler.capture.backend import Backend

_GROUP_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_param_group"
_HINTED = {
    "unshard": Category.ALL_GATHER.value,
    "wait_for_unshard": Category.UNSHARDED_PARAMETER.value,
    "post_backward": Category.REDUCE_SCATTER.value,
}


def _param_group_class():
    if _GROUP_MODULE not in sys.modules:
        try:  # fully_shard may be imported after the capture starts: import it now to patch it
            __import__(_GROUP_MODULE)
        except Exception:  # noqa: BLE001 - no distributed build, or no FSDP2 here
            return None
    return getattr(sys.modules.get(_GROUP_MODULE), "FSDPParamGroup", None)


def unsharded_grads(group):
    """(name, tensor) of the full gradients a parameter group is about to reduce."""
    for fsdp_param in getattr(group, "fsdp_params", ()):
        if not hasattr(fsdp_param, "_unsharded_param"):
            continue
        grad = getattr(fsdp_param, "unsharded_accumulated_grad", None)
        if grad is None:
            grad = fsdp_param.unsharded_param.grad
        if grad is not None:
            yield f"{getattr(fsdp_param, '_param_fqn', None) or 'param'}.unsharded_grad", grad


class FsdpInstrumentation:
    """Category hints around FSDPParamGroup's collectives, for one capture."""

    def __init__(self, capture, backend: Backend) -> None:
        self.capture = capture
        self.backend = backend
        self._saved: dict[str, object] = {}
        self._cls: type | None = None

    def install(self) -> bool:
        cls = _param_group_class()
        if cls is None:
            return False
        self._cls = cls
        for method, hint in _HINTED.items():
            original = getattr(cls, method, None)
            if original is None:
                continue
            self._saved[method] = original
            wrapped = self._with_hint(original, hint)
            if method == "post_backward":
                wrapped = self._naming_unsharded_grads(wrapped)
            setattr(cls, method, wrapped)
        return bool(self._saved)

    def remove(self) -> None:
        for method, original in self._saved.items():
            setattr(self._cls, method, original)
        self._saved = {}

    def _with_hint(self, original, hint: str):
        @functools.wraps(original)
        def method(group, *args, **kwargs):
            with api.category(hint):  # stamps only while a capture is active
                return original(group, *args, **kwargs)

        return method

    def _naming_unsharded_grads(self, post_backward):
        capture, backend = self.capture, self.backend

        @functools.wraps(post_backward)
        def method(group, *args, **kwargs):
            try:
                named = list(unsharded_grads(group))
                if named:
                    tag = backend.get_tag()
                    pos = capture.position()
                    backend.set_tag(tag)  # a CUDA position marker re-tags this thread
                    capture.register_roles(named, Category.UNSHARDED_GRADIENT.value, pos, capture.step_index)
            except Exception as e:  # noqa: BLE001 - ours: the capture stops, FSDP's backward goes on
                capture.capture_failed(e)
            return post_backward(group, *args, **kwargs)

        return method
