"""Per-row weights: one request's view of a UNet or text encoder in which some layers use other
weights for some batch rows.

A customized baseline drawn in the same batch as AlignIT needs the customized model's weights for
its own rows only: Custom Diffusion's W_q/W_k/W_v/W_out, a LoRA's low-rank updates. The shared
model is never changed. `overlay` returns a copy of the module tree in which only the modules on
the path to an edited layer are new objects (every parameter is shared), and each edited layer is
wrapped in `RowEdited`, which computes its rows with the edit. Built per request, so no other
request can see it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


def _forward(layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`layer`'s operation (linear or convolution) with other weights."""
    if isinstance(layer, RowEdited):
        layer = layer.base
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class Replace:
    """Custom Diffusion: the layer's weight, and its bias where one is given, replaced."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _forward(layer, x, self.weight, self.bias if self.bias is not None else layer.bias)

    def norm(self) -> float:
        """The Frobenius norm of the replaced weight (and bias)."""
        return math.hypot(float(self.weight.double().norm()),
                          0.0 if self.bias is None else float(self.bias.double().norm()))


@dataclass(frozen=True)
class LowRank:
    """LoRA: `scale · up(down(x))` added to the layer's own output."""

    down: torch.Tensor  # (rank, in) or, on a convolution, (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank, times the user's scale

    def delta(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.down.ndim == 4:  # the down projection is a convolution like the layer's, the up one 1x1
            return self.scale * F.conv2d(_forward(layer, x, self.down, None), self.up)
        return self.scale * F.linear(F.linear(x, self.down), self.up)

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _forward(layer, x, layer.weight, layer.bias) + self.delta(layer, x)

    def scaled(self, factor: float) -> LowRank:
        return replace(self, scale=self.scale * factor)

    def norm(self) -> float:
        """The Frobenius norm of the update `scale · up · down`, by the cheaper way: the product, or
        for a low rank the rank × rank Gram matrices, |U D|² = Σ (UᵀU) ⊙ (D Dᵀ). Both factors are
        divided by their largest number first, so that no square overflows."""
        down, up = self.down.flatten(1).float(), self.up.flatten(1).float()
        top_down, top_up = float(down.abs().max()), float(up.abs().max())
        if top_down == 0 or top_up == 0:
            return 0.0
        down, up = down / top_down, up / top_up
        (out, rank), inner = up.shape, down.shape[1]
        if rank * (out + inner) < out * inner:
            square = float(((up.T @ up) * (down @ down.T)).sum())
        else:
            square = float((up @ down).square().sum())
        return abs(self.scale) * top_down * top_up * math.sqrt(max(square, 0.0))


Edit = Replace | LowRank


class RowEdited(torch.nn.Module):
    """A linear or convolution layer whose output, for some batch rows, comes from edited weights.
    `edits` apply in order: (batch rows, or None for every row, Replace | LowRank)."""

    def __init__(self, base: torch.nn.Module, edits: tuple[tuple[torch.Tensor | None, Edit], ...]):
        super().__init__()
        self.base = base
        self.edits = edits

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def __getattr__(self, name):  # stride, padding, in_features, ... of the layer it wraps
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.edited(x, self.base(x))

    def edited(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y`, the wrapped layer's output for `x` (however it was computed), with the edits applied
        in place."""
        for rows, edit in self.edits:
            at = slice(None) if rows is None else rows
            if isinstance(edit, Replace):
                y[at] = edit(self.base, x[at]).to(y.dtype)
            else:
                y[at] += edit.delta(self.base, x[at]).to(y.dtype)
        return y


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing every parameter and child with `module`, with its own child list."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    if getattr(clone, "_compiled_call_impl", None) is not None:  # compiled for the original's own modules
        clone._compiled_call_impl = None
    return clone


def _hooks_in_place(root: torch.nn.Module) -> None:
    """transformers 5 installs a model's output-capturing hooks (its hidden states) at its first call
    that asks for them, on the model whose forward collects them (a CLIPTextModelWithProjection's
    inner `text_model`) and every module below it. Installed through a copy they would also land in
    the modules the copy shares with `root`, and `root`'s own first call would add them again (every
    hidden state recorded twice: SD3's penultimate CLIP layer read from the wrong place, for every
    later request). So `root` makes its first such call before it is copied: a two-token input, once
    (where transformers has installed them already, nothing is run)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils import output_capturing  # noqa: F401 - transformers 5; 4 uses no hooks
    except ImportError:
        return
    if not isinstance(root, PreTrainedModel) or any(getattr(m, "_output_capturing_hooks_installed", False)
                                                     for m in root.modules()):
        return
    with torch.no_grad():
        try:
            root(input_ids=torch.tensor([[0, 1]], device=root.device), output_hidden_states=True)
        except TypeError:  # a model without token ids or hidden states: transformers hooks nothing here
            pass


def overlay(root: torch.nn.Module, edits: dict[str, list[tuple[torch.Tensor | None, Edit]]]) -> torch.nn.Module:
    """`root` with each named layer wrapped in RowEdited; `root` itself is unchanged. No edits: `root`."""
    if not edits:
        return root
    _hooks_in_place(root)
    copies = {"": _shallow(root)}
    for name, layer_edits in edits.items():
        parent, path = copies[""], ""
        *parents, leaf = name.split(".")
        for part in parents:
            path = f"{path}.{part}" if path else part
            if path not in copies:
                copies[path] = _shallow(parent._modules[part])
                parent._modules[part] = copies[path]
            parent = copies[path]
        parent._modules[leaf] = RowEdited(parent._modules[leaf], tuple(layer_edits))
    return copies[""]
