"""Weight-only int8 quantization of nn.Linear, with one scale per output channel.

    quantize_linears(model)            # every Linear but lm_head, in place

The int8 weight and its scales are frozen parameters, so the profiler counts
them as parameters. The matmul runs in the activation dtype on a dequantized
copy of the weight, made per call and freed right after: simple and exact to
reason about, though a fused int8 kernel would avoid the copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127


class Int8Linear(nn.Module):
    """y = x @ (int8 W * scale)^T + b, with W (out, in) int8 and scale (out,)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, device=None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty((out_features, in_features), dtype=torch.int8, device=device), requires_grad=False
        )
        self.scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        scale = w.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny) / QMAX
        with torch.no_grad():
            q.weight.copy_((w.float() / scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8))
            q.scale.copy_(scale.to(w.dtype))
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight * self.scale[:, None]  # int8 * float -> the scale's dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output rather than the weight keeps the temporary an int8->dtype
        # cast of W: (x @ W^T) * s == x @ (W * s)^T, one scale per output column.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear whose name's last part is not in `skip` by an Int8Linear,
    in place; returns the model. lm_head is skipped by default because it is usually tied
    to the embedding: quantizing it would add an int8 copy instead of saving bytes."""
    targets = [
        (name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(linear))
    return model
