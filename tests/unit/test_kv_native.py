"""A KV cache measured by the tracker's kv_bytes, in one C++ call, gives the row the Python loop
of profiler/capture/kv.py gives: over grown, preallocated, shared, empty and odd layers."""

from __future__ import annotations

import types

import pytest
import torch

from profiler.capture import native
from profiler.capture.kv import kv_row

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def kv_bytes():
    module, error = native.load(cuda=False)
    if module is None:
        pytest.skip(f"the tracker does not build here: {error}")
    return module.kv_bytes


def layer(keys=None, values=None, **attrs):
    return types.SimpleNamespace(keys=keys, values=values, **attrs)


class Static:
    """A preallocated layer: all its positions held, get_seq_length() of them filled."""

    def __init__(self, keys, values, filled, fails=False):
        self.keys, self.values, self.max_cache_len = keys, values, keys.shape[-2]
        self._filled, self._fails = filled, fails

    def get_seq_length(self):
        if self._fails:
            raise RuntimeError("an unknown layer kind")
        return self._filled


def cache(*layers):
    return types.SimpleNamespace(layers=list(layers))


def kv(batch, positions, heads=2, dim=8, dtype=torch.float32):
    return torch.randn(batch, heads, positions, dim).to(dtype)


def caches():
    big = torch.zeros(3, 2, 40, 8)
    shared = torch.zeros(2, 3, 2, 10, 8)  # K and V as views of one buffer
    yield "grown", cache(*(layer(kv(3, 7 + i), kv(3, 7 + i)) for i in range(4)))
    yield "preallocated", cache(*(Static(kv(3, 32), kv(3, 32), filled=9) for _ in range(3)))
    yield "preallocated, past its length", cache(Static(kv(2, 8), kv(2, 8), filled=50))
    yield "preallocated, its length unknown", cache(Static(kv(2, 8), kv(2, 8), filled=3, fails=True))
    yield "sliding views of a larger tensor", cache(layer(big[:, :, 10:], big[:, :, 10:].clone()))
    yield "K and V in one buffer", cache(layer(shared[0], shared[1]))
    yield "one storage twice", cache(layer(big, big), layer(big[:, :, :5], kv(3, 5)))
    yield "bf16 and mixed", cache(layer(kv(1, 4, dtype=torch.bfloat16), kv(1, 4)), layer(kv(1, 6), kv(1, 6)))
    yield (
        "layers without states first",
        cache(layer(), layer(torch.empty(0), torch.empty(0)), layer(kv(2, 3)), layer(kv(4, 5), kv(4, 5))),
    )
    yield "a 1-d tensor and an int", cache(layer(torch.ones(5), torch.ones(5)), layer(kv(2, 3), 7))
    yield "no layers", cache()
    yield "no states at all", cache(layer(), layer(None, kv(1, 1)))


@pytest.mark.parametrize("name,kv_cache", list(caches()), ids=[n for n, _ in caches()])
def test_native_and_python_rows_agree(kv_bytes, name, kv_cache):
    assert kv_row(kv_cache, "c", native=kv_bytes) == kv_row(kv_cache, "c")


def test_a_real_dynamic_cache_agrees(kv_bytes):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    dynamic = transformers.DynamicCache(config=config)
    for i in range(3):
        dynamic.update(kv(2, 5, heads=2, dim=8), kv(2, 5, heads=2, dim=8), i)
    row = kv_row(dynamic, "d", native=kv_bytes)
    assert row == kv_row(dynamic, "d")
    assert row["tokens"] == 5 and row["token_state_bytes"] == row["reserved_bytes"] == 3 * 2 * 2 * 5 * 2 * 8 * 4


def test_a_tensor_without_memory_of_its_own_is_measured_in_python(kv_bytes):
    class Wrapper(torch.Tensor):  # a wrapper subclass (as DTensor is): no storage of its own
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(func)

    for keys in (Wrapper(kv(1, 2)), kv(1, 2).to("meta")):
        odd = cache(layer(kv(1, 2)), layer(keys, kv(1, 2)))
        assert kv_bytes([(x.keys, x.values, -1) for x in odd.layers]) is None
        try:
            python = kv_row(odd, "c")
        except Exception as e:  # noqa: BLE001 - whatever the loop does, the native path does too
            with pytest.raises(type(e)):
                kv_row(odd, "c", native=kv_bytes)
        else:
            assert kv_row(odd, "c", native=kv_bytes) == python
