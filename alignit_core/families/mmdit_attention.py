"""Side-stream AlignIT inside MMDiT joint attention (SD3, Flux): processors, request state, maps.

In an MMDiT block text and image tokens attend jointly and the text tokens have their own stream,
updated by every block, so a concept's keys and values exist per block and per step. AlignIT
takes them from a *side stream*: the customized model's text branch run on p', alongside the main
run. At each block the side stream's text tokens attend to [their own keys ; the main row's image
keys] (nothing of the main run attends to them), and after the norms and RoPE the main row's text
keys/values at the concept's positions are overwritten with the side stream's rows. The side
stream is computed here with the block's own modules (the branch's copy of them where a
customized branch is given), op for op as diffusers computes the main text stream, so with p' = p
and the base weights it reproduces the main stream bit for bit (tested): per block it costs only
its text tokens, never another copy of the image tokens.

One processor per attention module, installed once at load; it holds only its block's index.
Everything a request needs travels in an `MMDiTState` passed as `joint_attention_kwargs=
{"alignit": state}`; with no state the processors compute exactly what diffusers' own do. The
timestep embedding a side stream's modulation needs is not handed to attention processors, so a
forward pre-hook on the first block copies it into the request's own state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..weights import RowEdited

MAP_HEADS_AT_ONCE = 8  # heads whose fp32 scores a recording block holds at once (full size: 8 x 4096 x 589)


@dataclass
class SideStream:
    """The customized text branch on p', run alongside one main batch row (its conditional half)."""

    row: int  # the main batch row whose image keys it attends to and whose text rows it writes
    start: torch.Tensor  # (1, text, dim): context_embedder(enc'(p')), the side text before block 0
    targets: torch.Tensor  # (n,) long: joint-text positions of the main row that are written
    sources: torch.Tensor  # (n,) long: the side text's positions they are read from
    joint: list  # the branch's joint blocks (its own context weights)
    single: list  # the branch's single-stream blocks (Flux), else []
    hidden: torch.Tensor | None = None  # (1, text, dim) at the current block; reset each step


@dataclass
class MapSums:
    """Running sums of image-query x text-key attention, head-mean, for the recorded rows."""

    rows: tuple[int, ...]  # batch rows recorded (the conditional half)
    total: torch.Tensor  # (r, pixels, text) fp32
    blocks: frozenset[int]
    steps: tuple[int, int]  # [start, end)
    added: int = 0  # (block, step) pairs summed

    def records(self, block: int, step: int) -> bool:
        return block in self.blocks and self.steps[0] <= step < self.steps[1]

    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """query (batch, heads, pixels, d) of the image tokens, key (batch, heads, text, d) of the text.
        The joint softmax over all keys, renormalised over the text columns, equals the softmax over
        the text columns alone (the image columns' mass cancels), which is what is computed."""
        rows = list(self.rows)
        q, k = query[rows].float(), key[rows].float()
        scale = q.shape[-1] ** -0.5
        for h in range(0, q.shape[1], MAP_HEADS_AT_ONCE):
            scores = torch.matmul(q[:, h: h + MAP_HEADS_AT_ONCE], k[:, h: h + MAP_HEADS_AT_ONCE].transpose(-1, -2))
            self.total += (scores * scale).softmax(dim=-1).sum(1) / q.shape[1]
        self.added += 1

    def maps(self) -> torch.Tensor:
        """(r, text, pixels): averaged over blocks and steps; each pixel sums to 1 over the text."""
        return (self.total / max(self.added, 1)).transpose(1, 2)


@dataclass(frozen=True)
class KVRecord:
    """What one block's attention used at one step, before and after the swap (read-only; tests).
    Tensors are (batch, tokens, heads, head_dim); `text` the joint positions of the text tokens."""

    block: int
    step: int
    key: torch.Tensor
    value: torch.Tensor
    swapped_key: torch.Tensor
    swapped_value: torch.Tensor
    text: slice


@dataclass
class MMDiTState:
    """Everything one request asks of the transformer's attention."""

    sides: list[SideStream] = field(default_factory=list)
    swap_blocks: frozenset[int] = frozenset()
    swap_steps: tuple[int, int] = (0, 10**9)  # [start, end)
    swap_kv: str = "kv"
    maps: MapSums | None = None
    on_kv: object = None  # optional callable(KVRecord)
    text_tokens: int = 0  # joint text length (Flux single-stream blocks split their sequence with it)
    step: int = 0
    temb: torch.Tensor | None = None  # (batch, dim), copied in by the first block's pre-hook

    def begin_step(self, step: int) -> None:
        self.step = step
        for side in self.sides:
            side.hidden = side.start

    def _swapping(self) -> bool:
        return bool(self.sides) and bool(self.swap_blocks) and self.swap_steps[0] <= self.step < self.swap_steps[1]

    def swaps(self, block: int) -> bool:
        return self._swapping() and block in self.swap_blocks

    def side_runs(self, block: int) -> bool:
        """The side streams compute this block's keys and values (a swap here or later)."""
        return self._swapping() and block <= max(self.swap_blocks)

    def side_advances(self, block: int) -> bool:
        """The side streams' text is carried past this block (a later block swaps)."""
        return self._swapping() and block < max(self.swap_blocks)

    def record(self, block, key, value, swapped_key, swapped_value, text: slice) -> None:
        if self.on_kv is not None:
            self.on_kv(KVRecord(block, self.step, key, value, swapped_key, swapped_value, text))


def _modulation(norm, temb: torch.Tensor, row: int, parts: int, dtype=None) -> list[torch.Tensor]:
    """An adaptive norm's modulation for one batch row, from the whole batch's embedding: a linear
    layer over one row rounds differently from one over the batch (CPU kernels for fewer than four
    rows), and the side stream must match the main row bit for bit."""
    emb = norm.silu(temb)
    emb = norm.linear(emb if dtype is None else emb.to(dtype))
    return [c[row: row + 1] for c in emb.chunk(parts, dim=1)]


def _modulated(norm, x, shift, scale):
    return norm.norm(x) * (1 + scale[:, None]) + shift[:, None]


def _write(key, value, sides, side_kv, mode: str, seq_dim: int):
    """Main text keys/values with each side stream's rows written at its targets (in place)."""
    dim = seq_dim - 1  # the token dimension once the batch row is selected
    for side, (k, v) in zip(sides, side_kv):
        if "k" in mode:
            key.select(0, side.row).index_copy_(dim, side.targets, k[0].index_select(dim, side.sources))
        if "v" in mode:
            value.select(0, side.row).index_copy_(dim, side.targets, v[0].index_select(dim, side.sources))


# ------------------------------------------------------------------------------ SD3 (JointTransformerBlock)

def _sd3_heads(x, batch, heads):
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (batch, heads, tokens, d)


def _sd3_side_qkv(state: MMDiTState, side: SideStream, index: int):
    """Side text at block `index`: (query, key, value) (1, heads, text, d) and the modulation kept
    for the update after attention."""
    block = side.joint[index]
    attn = block.attn
    if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
        norm = block.norm1_context
        scale, shift = _modulation(norm, state.temb, side.row, 2, dtype=side.hidden.dtype)
        x, mods = norm.norm(side.hidden) * (1 + scale)[:, None, :] + shift[:, None, :], None
    else:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1_context, state.temb, side.row, 6)
        x, mods = _modulated(block.norm1_context, side.hidden, shift, scale), (gate, shift_mlp, scale_mlp, gate_mlp)
    q, k, v = (_sd3_heads(p(x), 1, attn.heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v, mods


def _linear_as_on_a_slice(linear, x: torch.Tensor, batch: int) -> torch.Tensor:
    """`linear(x)` as torch computes it on the text slice of a `batch`-row output: its fused path
    (addmm, bias inside) is taken only for a contiguous 3-D input, which that slice is only for one
    row; otherwise a matmul, then the bias added: the same in fp32 on CPU, not in bf16. A layer a
    LoRA edits (a customized branch's view) adds its update to that."""
    if batch == 1:
        return linear(x)
    if isinstance(linear, RowEdited):
        return linear.edited(x, _linear_as_on_a_slice(linear.base, x, batch))
    return torch.matmul(x, linear.weight.t()) + linear.bias


def _sd3_side_update(side: SideStream, index: int, q, k, v, mods, image_key, image_value, batch: int):
    """Carry the side text past block `index`: attention to [main row's image ; own text], then the
    block's context output, gate, feed-forward, as JointTransformerBlock.forward does (`batch`: the
    main batch's rows, on which the output projection's rounding depends)."""
    block = side.joint[index]
    gate, shift_mlp, scale_mlp, gate_mlp = mods
    out = F.scaled_dot_product_attention(q, torch.cat([image_key, k], dim=2), torch.cat([image_value, v], dim=2),
                                         dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(1, -1, out.shape[1] * out.shape[3]).to(q.dtype)
    h = side.hidden + gate.unsqueeze(1) * _linear_as_on_a_slice(block.attn.to_add_out, out, batch)
    normed = block.norm2_context(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    side.hidden = h + gate_mlp.unsqueeze(1) * block.ff_context(normed)


class SD3Processor:
    """For the `attn` (joint) and `attn2` (image-only, SD3.5) modules of JointTransformerBlock;
    without a request state it computes exactly what JointAttnProcessor2_0 does."""

    def __init__(self, index: int):
        self.index = index  # the block's index in transformer_blocks; the only thing a processor holds

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 alignit: MMDiTState | None = None, **kwargs):
        batch, pixels = hidden_states.shape[:2]
        query = _sd3_heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _sd3_heads(attn.to_k(hidden_states), batch, attn.heads)
        value = _sd3_heads(attn.to_v(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:  # attn2: image tokens only
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))

        text_q, text_k, text_v = (_sd3_heads(p(encoder_hidden_states), batch, attn.heads)
                                  for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        state, i = alignit, self.index
        runs = state is not None and state.side_runs(i)
        side_qkv = [_sd3_side_qkv(state, side, i) for side in state.sides] if runs else []
        if runs and state.swaps(i):
            before = (text_k.clone(), text_v.clone()) if state.on_kv is not None else None
            _write(text_k, text_v, state.sides, [(k, v) for _, k, v, _ in side_qkv], state.swap_kv, seq_dim=2)
            if before is not None:
                state.record(i, *(torch.cat([a, b], 2).transpose(1, 2) for a, b in
                                  ((key, before[0]), (value, before[1]), (key, text_k), (value, text_v))),
                             slice(pixels, pixels + text_k.shape[2]))
        elif state is not None and state.on_kv is not None:
            k_all, v_all = torch.cat([key, text_k], 2).transpose(1, 2), torch.cat([value, text_v], 2).transpose(1, 2)
            state.record(i, k_all, v_all, k_all, v_all, slice(pixels, pixels + text_k.shape[2]))

        out = F.scaled_dot_product_attention(torch.cat([query, text_q], dim=2), torch.cat([key, text_k], dim=2),
                                             torch.cat([value, text_v], dim=2), dropout_p=0.0, is_causal=False)
        if state is not None and state.maps is not None and state.maps.records(i, state.step):
            state.maps.add(query, text_k)
        if state is not None and state.side_advances(i) and not attn.context_pre_only:
            for side, (q, k, v, mods) in zip(state.sides, side_qkv):
                _sd3_side_update(side, i, q, k, v, mods, key[side.row: side.row + 1],
                                 value[side.row: side.row + 1], batch)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        image, text = out[:, :pixels], out[:, pixels:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


# ------------------------------------------------------------------------------ Flux

def _rope(x, rotary, start: int, stop: int):
    """RoPE on tokens [start, stop) of the joint sequence (x: batch, tokens, heads, d). Flux's text
    positions are all zero, so on text rows this is the identity, bit for bit; applied anyway."""
    if rotary is None:
        return x
    cos, sin = rotary
    return apply_rotary_emb(x, (cos[start:stop], sin[start:stop]), sequence_dim=1)


def _flux_heads(attn, x):
    return x.unflatten(-1, (-1, attn.head_dim))  # (batch, tokens, heads, d)


def _flux_side_qkv(state: MMDiTState, side: SideStream, index: int, rotary):
    block = side.joint[index]
    attn = block.attn
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1_context, state.temb, side.row, 6)
    x = _modulated(block.norm1_context, side.hidden, shift, scale)
    q, k, v = (_flux_heads(attn, p(x)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k = attn.norm_added_q(q), attn.norm_added_k(k)
    text = side.hidden.shape[1]
    return _rope(q, rotary, 0, text), _rope(k, rotary, 0, text), v, (gate, shift_mlp, scale_mlp, gate_mlp)


def _flux_side_attention(q, k, v, image_key, image_value):
    out = dispatch_attention_fn(q, torch.cat([k, image_key], dim=1), torch.cat([v, image_value], dim=1))
    return out.flatten(2, 3).to(q.dtype)


def _flux_side_update(side: SideStream, index: int, q, k, v, mods, image_key, image_value):
    """As FluxTransformerBlock.forward does for the text stream."""
    block = side.joint[index]
    gate, shift_mlp, scale_mlp, gate_mlp = mods
    out = block.attn.to_add_out(_flux_side_attention(q, k, v, image_key, image_value).contiguous())
    h = side.hidden + gate.unsqueeze(1) * out
    normed = block.norm2_context(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    h = h + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    side.hidden = h.clip(-65504, 65504) if h.dtype == torch.float16 else h


def _flux_single_side_qkv(state: MMDiTState, side: SideStream, index: int, rotary):
    block = side.single[index]
    shift, scale, gate = _modulation(block.norm, state.temb, side.row, 3)
    x = _modulated(block.norm, side.hidden, shift, scale)
    attn = block.attn
    q, k, v = (_flux_heads(attn, p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    text = side.hidden.shape[1]
    return _rope(q, rotary, 0, text), _rope(k, rotary, 0, text), v, (gate, x)


def _flux_single_side_update(side: SideStream, index: int, q, k, v, mods, image_key, image_value):
    """As FluxSingleTransformerBlock.forward does for the text rows of its sequence."""
    block = side.single[index]
    gate, x = mods
    out = torch.cat([_flux_side_attention(q, k, v, image_key, image_value), block.act_mlp(block.proj_mlp(x))], dim=2)
    h = side.hidden + gate.unsqueeze(1) * block.proj_out(out)
    side.hidden = h.clip(-65504, 65504) if h.dtype == torch.float16 else h


class FluxProcessor:
    """For FluxTransformerBlock.attn (joint: `single=False`) and FluxSingleTransformerBlock.attn
    (`single=True`); without a request state it computes exactly what FluxAttnProcessor does.
    `index` counts joint blocks then single blocks (the single block j is index joint + j)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, index: int, single: bool, joint_blocks: int):
        self.index, self.single, self.joint_blocks = index, single, joint_blocks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 alignit: MMDiTState | None = None):
        query, key, value = (_flux_heads(attn, p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (_flux_heads(attn, p(encoder_hidden_states))
                                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        state, i = alignit, self.index
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else (
            state.text_tokens if state is not None else 0)
        runs = state is not None and state.side_runs(i)
        side_qkv, local = [], i - self.joint_blocks if self.single else i
        if runs:
            make = _flux_single_side_qkv if self.single else _flux_side_qkv
            side_qkv = [make(state, side, local, image_rotary_emb) for side in state.sides]
        if runs and state.swaps(i):
            before = (key.clone(), value.clone()) if state.on_kv is not None else None
            _write(key, value, state.sides, [(k, v) for _, k, v, _ in side_qkv], state.swap_kv, seq_dim=1)
            if before is not None:
                state.record(i, before[0], before[1], key, value, slice(0, text))
        elif state is not None and state.on_kv is not None:
            state.record(i, key, value, key, value, slice(0, text))

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        if state is not None and state.maps is not None and state.maps.records(i, state.step):
            state.maps.add(query[:, text:].transpose(1, 2), key[:, :text].transpose(1, 2))
        if state is not None and state.side_advances(i):
            update = _flux_single_side_update if self.single else _flux_side_update
            for side, (q, k, v, mods) in zip(state.sides, side_qkv):
                row = slice(side.row, side.row + 1)
                update(side, local, q, k, v, mods, key[row, text:], value[row, text:])
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


# ------------------------------------------------------------------------------ installation

def _keep_temb(block, args, kwargs):
    """Forward pre-hook on the first block: the request's state gets this step's timestep embedding."""
    state = (kwargs.get("joint_attention_kwargs") or {}).get("alignit")
    if state is not None:
        state.temb = kwargs["temb"]


def install(transformer, family: str) -> int:
    """Put the processors on every attention module of `transformer` and the pre-hook on its first
    block; return the number of blocks (joint + single). Idempotent."""
    if getattr(transformer, "_alignit_blocks", None) is not None:
        return transformer._alignit_blocks
    joint = transformer.transformer_blocks
    if family == "sd3":
        for i, block in enumerate(joint):
            block.attn.set_processor(SD3Processor(i))
            if block.attn2 is not None:
                block.attn2.set_processor(SD3Processor(i))
        blocks = len(joint)
    else:
        singles = transformer.single_transformer_blocks
        for i, block in enumerate(joint):
            block.attn.set_processor(FluxProcessor(i, False, len(joint)))
        for j, block in enumerate(singles):
            block.attn.set_processor(FluxProcessor(len(joint) + j, True, len(joint)))
        blocks = len(joint) + len(singles)
    joint[0].register_forward_pre_hook(_keep_temb, with_kwargs=True)
    transformer._alignit_blocks = blocks
    return blocks
