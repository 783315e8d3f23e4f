"""ONE stateless attention processor: the request's K/V + attention-map recording.

Installed once per attention module at load time. Everything a request needs travels in a
`CallState` passed as `cross_attention_kwargs={"alignit": state}`; with no state the processor
is plain scaled-dot-product attention, so two requests can share the UNet without seeing each
other. Text conditioning is the same at every step, so each cross-attention layer projects a
request's keys and values (swap rows included, kv.py) once and reuses them at every step:
AlignIT adds no per-step work to the attention itself. Only the layers that record add an fp32
softmax of the conditional rows, whose head-mean is added into a running sum (memory does not
grow with steps); the layer's output is always the same SDPA, so recording changes no pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kv import RequestKV, blend, project


MAP_SCORE_BYTES = 512 * 2**20  # fp32 scores summed at once when a step's recording layers are added up


@dataclass
class MapStore:
    """Running sums of head-mean cross-attention probabilities at one resolution.

    A recording layer hands over its recorded rows' queries and keys; a step's are added up together,
    when the next step's first arrive or the maps are read: one batched matmul, softmax, head mean and
    sum per step rather than per layer. A GPU run is bound by operator dispatch (SDXL at 1024 px
    records 50 layers a step, about 14 operators each when added one by one)."""

    rows: range  # batch rows to record (the conditional half): a contiguous range
    side: int  # maps are side x side
    tokens: int  # keep the first `tokens` key positions
    total: torch.Tensor  # (r, side*side, tokens) fp32
    layers: frozenset[str] = frozenset()  # the cross-attention layers that record (all side x side)
    steps: tuple[int, int] = (0, 10**9)  # record during steps [start, end)
    layers_added: int = 0
    _pending: list = field(default_factory=list, repr=False)  # this step's (queries, keys), not yet added
    _pending_step: int | None = field(default=None, repr=False)

    @classmethod
    def create(cls, rows: range, side: int, tokens: int, device, layers, steps=(0, 10**9)) -> MapStore:
        return cls(rows, side, tokens, torch.zeros(len(rows), side * side, tokens, device=device,
                                                   dtype=torch.float32), frozenset(layers), tuple(steps))

    def records(self, layer: str, step: int) -> bool:
        return layer in self.layers and self.steps[0] <= step < self.steps[1]

    def keys(self, k: torch.Tensor, scale: float) -> torch.Tensor:
        """The recorded rows' keys as the scores need them: (r, heads, d, keys) fp32, scaled."""
        return k[self.rows.start: self.rows.stop].float().transpose(-1, -2) * scale

    def add(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, step: int) -> None:
        """One layer's head-mean probabilities, added with the rest of its step's; q (batch, heads,
        pixels, d), keys from `keys()`. A layer with an attention mask is added at once."""
        rows = slice(self.rows.start, self.rows.stop)
        if mask is not None:
            self._add([q[rows]], [keys], mask[rows].float())
            return
        if step != self._pending_step:
            self.flush()
            self._pending_step = step
        self._pending.append((q[rows], keys))

    def flush(self) -> None:
        """Add the pending layers: those of one shape at once, in chunks of MAP_SCORE_BYTES of scores."""
        groups: dict = {}
        for q, keys in self._pending:
            groups.setdefault((q.shape, keys.shape), []).append((q, keys))
        self._pending = []
        for (q_shape, k_shape), pairs in groups.items():
            per_layer = 4 * q_shape[0] * q_shape[1] * q_shape[2] * k_shape[-1]
            chunk = max(1, MAP_SCORE_BYTES // per_layer)
            for i in range(0, len(pairs), chunk):
                part = pairs[i: i + chunk]
                self._add([q for q, _ in part], [k for _, k in part])

    def _add(self, queries: list, keys: list, mask: torch.Tensor | None = None) -> None:
        scores = torch.matmul(torch.stack(queries).float(), torch.stack(keys))  # (layers, r, heads, pixels, keys)
        if mask is not None:
            scores += mask
        probs = scores.softmax(dim=-1)
        self.total += probs[..., : self.tokens].mean(2).sum(0)
        self.layers_added += len(queries)

    def maps(self) -> torch.Tensor:
        """(r, tokens, side, side), averaged over layers and steps."""
        self.flush()
        m = self.total / max(self.layers_added, 1)
        return m.permute(0, 2, 1).reshape(len(self.rows), self.tokens, self.side, self.side)


@dataclass
class CallState:
    """Everything one request asks of the attention layers."""

    request: RequestKV | None = None  # the request's conditioning, swapped copy, concept cells and strengths
    swap_steps: tuple[int, int] = (0, 10**9)  # swap during steps [start, end)
    maps: MapStore | None = None
    step: int = 0  # set by the denoising loop
    on_kv: object = None  # optional callable(layer, step, key, value) to inspect K/V (tests; read-only)
    _projected: dict = field(default_factory=dict, repr=False)  # (layer, swapping) -> (key, value)
    _map_keys: dict = field(default_factory=dict, repr=False)  # (layer, swapping) -> MapStore.keys()

    @property
    def swapping(self) -> bool:
        return self.swap_steps[0] <= self.step < self.swap_steps[1]

    def keys_values(self, name: str, attn, context: torch.Tensor):
        """(keys, values, version) of the layer at this step: projected on first use of a version,
        then reused (two versions when the swap covers only some steps). version is None when
        `context` is not this request's conditioning: then nothing is written or kept."""
        if self.request is None or context is not self.request.context:
            return (*project(attn, name, context, []), None)
        version = (name, self.swapping and self.request.swapped is not None)
        hit = self._projected.get(version)
        if hit is None:
            hit = self._projected[version] = self._project(name, attn, version[1])
        return (*hit, version)

    def _project(self, name: str, attn, swapping: bool):
        if not swapping:
            return project(attn, name, self.request.context, [])
        key, value = project(attn, name, self.request.swapped, self.request.custom)
        if self.request.strength == (1.0, 1.0):
            return key, value
        own = self._projected.get((name, False))  # the row's own keys and values, kept if already made
        if own is None:
            own = self._projected[(name, False)] = project(attn, name, self.request.context, [])
        (sk, sv), cells = self.request.strength, self.request.cells
        return blend(own[0], key, cells, sk), blend(own[1], value, cells, sv)

    def map_keys(self, version, k: torch.Tensor, scale: float) -> torch.Tensor:
        """A recording layer's keys in the form MapStore.add takes, prepared once per K/V version."""
        if version is None:
            return self.maps.keys(k, scale)
        if version not in self._map_keys:
            self._map_keys[version] = self.maps.keys(k, scale)
        return self._map_keys[version]


class AlignITProcessor:
    """Attention processor for diffusers' `Attention` modules (self- and cross-attention)."""

    def __init__(self, name: str):
        self.name = name  # the module's name in the UNet; the only thing a processor holds

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 alignit: CallState | None = None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            seq = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if cross and alignit is not None:  # the request's part runs eagerly even inside a compiled UNet
            out = _alignit_attention(self.name, alignit, attn, query, encoder_hidden_states, attention_mask, batch)
        else:
            context = hidden_states if not cross else (
                attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
            q, k, v = _heads(attn, query, attn.to_k(context), attn.to_v(context), batch)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _heads(attn, query, key, value, batch):
    """(batch, heads, tokens, head_dim) views, with the module's q/k norms."""
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


@torch.compiler.disable
def _alignit_attention(name: str, state: CallState, attn, query, context, attention_mask, batch):
    """Cross-attention of one request: the request's keys and values (rows written, projected
    once per request), SDPA, and on a recording layer the fp32 probabilities of the recorded rows
    into the running sums. Kept out of `torch.compile` graphs: what it reads (step, writes, maps)
    changes every call, and compiled code would specialise on it."""
    key, value, version = state.keys_values(name, attn, context)
    if state.on_kv is not None:
        state.on_kv(name, state.step, key, value)
    q, k, v = _heads(attn, query, key, value, batch)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    store = state.maps
    if store is not None and store.records(name, state.step):
        store.add(q, state.map_keys(version, k, attn.scale), attention_mask, state.step)
    return out


def install(denoiser) -> dict:
    """Put an AlignITProcessor on every attention module of `denoiser`; return them by name."""
    from diffusers.models.attention_processor import Attention

    modules = {name: m for name, m in denoiser.named_modules() if isinstance(m, Attention)}
    denoiser.set_attn_processor({f"{name}.processor": AlignITProcessor(name) for name in modules})
    return modules
