"""Attention processors for mask-guided self-attention fusion (docs/METHOD.md §6).

One processor class sits on every attention layer of the UNet (set with `set_attn_processor`
for the duration of a fused sampling, see `fusion_processors`). A layer is known by its
processor name and by its block number: the UNet's cross-attention blocks numbered in forward
order, down blocks, mid block, up blocks (SD 2.1 and the tiny model: down 0, 1, 2, mid 3,
up 4, 5, 6). What a processor does in one UNet call comes from a state object passed as
`cross_attention_kwargs={"fusion": state}` (diffusers hands it to every attention layer):

- no state: plain, the model's own attention (diffusers' `AttnProcessor2_0`);
- `Record` (the reference's and the base's passes): plain output, and it keeps
  - the self-attention keys and values (all CFG rows) of the blocks the target fuses at this step,
  - at the mask layers (cross-attention layers whose query grid is `mask_resolution`), the
    attention probabilities of the conditional half of the CFG batch, averaged over heads;
- `Fuse` (the target's pass): at the self-attention layers of the blocks that fuse at this
  step, each target row attends with its own query Q and
      K' = M * K_r + (1 - M) * K,   V' = M * V_r + (1 - M) * V,   out = softmax(Q K'^T / sqrt(d)) V'
  where K_r, V_r are its reference's keys and values recorded at the same layer and step, and
  M (one value per key position) is the reference's fusion mask at this layer's grid, shared by
  both CFG halves and all heads. Without a mask, K' = K_r and V' = V_r.
- `Split`: several batches in one call, each with its own state (`fusion.py` runs the targets of
  step i and the references of step i + 1 together).

The six `inject_component` flags (self Q, K, V, cross Q, K, V), as the release reads them (docs/METHOD.md
§6.4): the self Q flag (with its own `inject_t`/`inject_l` ranges) is the switch, deciding
where the target's self-attention fuses, though the target keeps its own query; there the self K
flag (with its ranges) says whether K is blended, the self V flag whether V is. The three
cross-attention flags change nothing ("everything else in the target's forward pass is
unchanged"): they are parsed and validated but do not act.

Processors never read weights: they call `attn.to_q`, `attn.to_k`, ... so peft LoRA adapters on
those layers take part as usual.
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from d_fusion.errors import UserError
from d_fusion.masks import resize_mask

BLOCK_GROUPS = ("down_blocks", "mid_block", "up_blocks")


@dataclass(frozen=True)
class Layer:
    name: str  # processor name, e.g. down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor
    block: int  # docs/METHOD.md §6.1's block number
    part: str  # "down", "mid" or "up": the UNet's part that holds the block
    self_attention: bool
    grid: int  # side of the layer's (square) query grid
    mask_layer: bool  # a cross-attention layer whose grid is the mask resolution


def _block_grids(unet):
    """{(group, index): (block number, grid side)} for the UNet's blocks that have attentions."""
    blocks, grid, number = {}, unet.config.sample_size, 0

    def visit(group, index, block):
        nonlocal number
        if getattr(block, "attentions", None):
            blocks[(group, index)] = (number, grid)
            number += 1

    for i, block in enumerate(unet.down_blocks):
        visit("down_blocks", i, block)
        if block.downsamplers is not None:
            grid //= 2
    visit("mid_block", None, unet.mid_block)
    for i, block in enumerate(unet.up_blocks):
        visit("up_blocks", i, block)
        if block.upsamplers is not None:
            grid *= 2
    return blocks


def _block_key(name):
    parts = name.split(".")
    return ("mid_block", None) if parts[0] == "mid_block" else (parts[0], int(parts[1]))


def attention_layers(unet, mask_resolution=0):
    """Every attention layer of the UNet (see `Layer`); mask_resolution 0 means latent side // 4."""
    mask_resolution = mask_resolution or unet.config.sample_size // 4
    blocks = _block_grids(unet)
    layers = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        _check_plain_layer(name, attn)
        block, grid = blocks[_block_key(name)]
        cross = attn.is_cross_attention
        part = _block_key(name)[0].removesuffix("_blocks").removesuffix("_block")
        layers.append(Layer(name, block, part, not cross, grid, cross and grid == mask_resolution))
    if not any(layer.mask_layer for layer in layers):
        grids = sorted({layer.grid for layer in layers if not layer.self_attention})
        raise UserError(
            f"config.fusion.mask_resolution = {mask_resolution}: no cross-attention layer of this UNet has a "
            f"{mask_resolution}x{mask_resolution} query grid; its grids are {grids} (0 picks latent side // 4)"
        )
    return layers


def _check_plain_layer(name, attn):
    """The fused and recording paths assume a transformer block's attention (as in every SD UNet)."""
    extras = dict(
        group_norm=attn.group_norm is not None,
        spatial_norm=attn.spatial_norm is not None,
        norm_cross=attn.norm_cross is not None,
        norm_q=attn.norm_q is not None,
        norm_k=attn.norm_k is not None,
        residual_connection=attn.residual_connection,
        rescale_output_factor=attn.rescale_output_factor != 1.0,
    )
    if any(extras.values()):
        raise UserError(f"attention layer {name} uses {[k for k, v in extras.items() if v]}, which fusion does not support")


@dataclass
class Record:
    """A pass whose output is plain and whose K/V and mask-layer probabilities are kept."""

    kv_blocks: frozenset  # blocks whose self-attention keys and values are kept
    keep_masks: bool  # keep the mask layers' cross-attention probabilities (for the object masks)
    cfg: bool  # the batch is [uncond; cond]
    keys: dict = field(default_factory=dict)  # layer name -> (B_cfg, N, inner)
    values: dict = field(default_factory=dict)
    probs_sum: torch.Tensor | None = None  # (B, Nq, 77): sum over mask layers of the head-averaged probs
    probs_layers: int = 0

    def add_probs(self, probs):
        self.probs_sum = probs if self.probs_sum is None else self.probs_sum + probs
        self.probs_layers += 1

    def cross_attention_map(self):
        """(B, Nq, 77): conditional cross-attention probabilities averaged over mask layers and heads."""
        return self.probs_sum / self.probs_layers


@dataclass
class Fuse:
    """The target's pass: fuse the reference's K/V into the self-attention of `k_blocks`/`v_blocks`."""

    reference: Record  # this step's reference pass
    guide: torch.Tensor  # (B,) long: row of each target's reference in the reference batch
    mask: torch.Tensor | None  # (R, g, g) fusion mask of each reference; None: fuse everywhere
    k_blocks: frozenset
    v_blocks: frozenset
    fused: list = field(default_factory=list)  # Layer of every fused call, in call order
    _masks_by_grid: dict = field(default_factory=dict)

    def reference_rows(self, batch, reference_batch):
        """(B_cfg,) row of the reference's CFG batch (R_cfg rows) that guides each target CFG row."""
        copies = batch // len(self.guide)  # 2 with CFG: [uncond; cond]
        half = torch.arange(copies, device=self.guide.device).repeat_interleave(len(self.guide))
        return self.guide.repeat(copies) + half * (reference_batch // copies)

    def mask_at(self, grid, batch):
        """(B_cfg, grid*grid): the mask of each row's reference at this grid; both CFG halves share it."""
        if grid not in self._masks_by_grid:
            self._masks_by_grid[grid] = resize_mask(self.mask, grid)[self.guide]  # (B, grid*grid)
        return self._masks_by_grid[grid].repeat(batch // len(self.guide), 1)


@dataclass
class Split:
    """One UNet call over several batches, each with its own state (a Record, a Fuse or None), e.g. the
    targets at step i and the references at step i + 1. The call's batch is the batches in order;
    with CFG it is [the batches' uncond rows; the batches' cond rows], as `guided_noise` makes it, and
    each batch's state sees its own rows in the same [uncond; cond] order."""

    states: list
    sizes: list  # samples of each batch
    cfg: bool

    def rows(self, device):
        """Per batch, its rows (B_j_cfg,) of the call's batch."""
        total, start, rows = sum(self.sizes), 0, []
        for size in self.sizes:
            own = torch.arange(start, start + size, device=device)
            rows.append(torch.cat([own, own + total]) if self.cfg else own)
            start += size
        return rows


def _heads(x, heads):
    """(B, N, heads * d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).flatten(2)


def blend(own, reference, mask):
    """M * reference + (1 - M) * own, per key position; the reference alone without a mask.

    own, reference: (B, h, N, d); mask: (B, N) or None, shared by all heads.
    """
    if mask is None:
        return reference
    mask = mask.to(own.dtype)[:, None, :, None]
    return mask * reference + (1 - mask) * own


def fused_attention(q, k, v, k_ref, v_ref, mask, fuse_k=True, fuse_v=True):
    """softmax(Q K'^T / sqrt(d)) V' with K' = blend(K, K_r, M) and V' = blend(V, V_r, M) where fused.

    q: (B, h, Nq, d); k, v, k_ref, v_ref: (B, h, N, d); mask: (B, N) or None. Returns (B, h, Nq, d).
    """
    key = blend(k, k_ref, mask) if fuse_k else k
    value = blend(v, v_ref, mask) if fuse_v else v
    return F.scaled_dot_product_attention(q, key, value)


class FusionAttnProcessor:
    def __init__(self, layer):
        self.layer = layer
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fusion=None):
        if fusion is not None and attention_mask is not None:
            raise ValueError(f"{self.layer.name}: fusion passes do not take an attention mask")
        if isinstance(fusion, Split) and any(self.route(state) for state in fusion.states):
            return self.split(attn, hidden_states, encoder_hidden_states, fusion)
        handler = None if isinstance(fusion, Split) else self.route(fusion)
        if handler is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return handler(attn, hidden_states, encoder_hidden_states, fusion)

    def route(self, state):
        """The method that handles `state` (a Record, a Fuse or None) at this layer; None: plain attention."""
        layer = self.layer
        if isinstance(state, Record):
            if layer.self_attention and layer.block in state.kv_blocks:
                return self.record_keys_values
            if layer.mask_layer and state.keep_masks:
                return self.record_probs
        if isinstance(state, Fuse) and layer.self_attention:
            if layer.block in state.k_blocks or layer.block in state.v_blocks:
                return self.fuse
        return None

    def split(self, attn, hidden_states, context, split):
        """Each batch of a Split call through its own state; the rows' outputs put back in place."""
        out = torch.empty_like(hidden_states)
        for state, rows in zip(split.states, split.rows(hidden_states.device)):
            out[rows] = self(attn, hidden_states[rows], None if context is None else context[rows], fusion=state)
        return out

    @staticmethod
    def project(attn, hidden_states, context):
        """Q (B, Nq, inner), K and V (B, N, inner) through the layer's own (possibly LoRA) projections."""
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

    @staticmethod
    def output(attn, out):
        """(B, h, Nq, d) attention output -> the layer's output (B, Nq, C)."""
        return attn.to_out[1](attn.to_out[0](_merge_heads(out)))

    def record_keys_values(self, attn, hidden_states, context, record):
        q, k, v = self.project(attn, hidden_states, hidden_states)
        record.keys[self.layer.name], record.values[self.layer.name] = k, v
        out = F.scaled_dot_product_attention(_heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads))
        return self.output(attn, out)

    def record_probs(self, attn, hidden_states, context, record):
        q, k, v = (_heads(x, attn.heads) for x in self.project(attn, hidden_states, context))
        cond = slice(q.shape[0] // 2, None) if record.cfg else slice(None)
        scores = q[cond].float() @ k[cond].float().transpose(-1, -2) * q.shape[-1] ** -0.5
        record.add_probs(scores.softmax(-1).mean(1))  # (B, Nq, 77), averaged over heads
        return self.output(attn, F.scaled_dot_product_attention(q, k, v))

    def fuse(self, attn, hidden_states, context, fusion):
        layer, batch = self.layer, hidden_states.shape[0]
        q, k, v = (_heads(x, attn.heads) for x in self.project(attn, hidden_states, hidden_states))
        k_ref, v_ref = fusion.reference.keys[layer.name], fusion.reference.values[layer.name]
        rows = fusion.reference_rows(batch, k_ref.shape[0])
        k_ref, v_ref = _heads(k_ref[rows], attn.heads), _heads(v_ref[rows], attn.heads)
        mask = None if fusion.mask is None else fusion.mask_at(layer.grid, batch)
        fusion.fused.append(layer)
        out = fused_attention(
            q, k, v, k_ref, v_ref, mask, layer.block in fusion.k_blocks, layer.block in fusion.v_blocks
        )
        return self.output(attn, out)


@contextlib.contextmanager
def processors_installed(model, processors):
    """The model's attention processors replaced by `processors` ({name: processor}) for the block."""
    own = model.attn_processors
    model.set_attn_processor(processors)
    try:
        yield
    finally:
        model.set_attn_processor(own)


def block_parts(layers):
    """{part: (first block, last block)} of the UNet's parts that have attentions, in forward order."""
    parts = {}
    for layer in sorted(layers, key=lambda layer: layer.block):
        first, _ = parts.get(layer.part, (layer.block, layer.block))
        parts[layer.part] = (first, layer.block)
    return parts


@contextlib.contextmanager
def fusion_processors(unet, mask_resolution=0):
    """Put a `FusionAttnProcessor` on every attention layer; the UNet's own processors come back after."""
    layers = attention_layers(unet, mask_resolution)
    with processors_installed(unet, {layer.name: FusionAttnProcessor(layer) for layer in layers}):
        yield layers
