"""Attention processors for mask-guided fusion on SD 3 / 3.5's joint attention (docs/METHOD.md §10).

`SD3Transformer2DModel` runs N `JointTransformerBlock`s, numbered 0..N-1 in forward order. Each
has one joint attention (`attn`): image tokens and text tokens are projected apart (`to_q/k/v`
and `add_q/k/v_proj`, each with its RMS q/k norm in SD 3.5), concatenated [image; text] and
attended together. SD 3.5 Medium's first blocks (`dual_attention_layers`) add an image-only
attention (`attn2`). One `JointFusionAttnProcessor` sits on every one of them for a fused
sampling (`joint_fusion_processors`); what it does in one transformer call comes from the state
passed as `joint_attention_kwargs={"fusion": state}`, the same state objects as the UNet's
(`d_fusion.attention.Record` and `Fuse`):

- no state: plain, diffusers' `JointAttnProcessor2_0`;
- `Record` (the reference's and the base's passes): plain output, and it keeps
  - at the blocks the target fuses at this step (`kv_blocks`), the image tokens' keys and values
    (after the key norm: the keys that enter the dot product), all CFG rows, of `attn` and `attn2`;
  - at the mask blocks (joint attentions only), the image-to-text attention probabilities of the
    conditional rows with the softmax over the text keys alone (the text block of the joint
    logits, renormalised), averaged over heads: they read like SD 2.1's cross-attention maps;
- `Fuse` (the target's pass): at the fused blocks, with M the reference's mask on the image grid,
      K'_img = M * K_r + (1 - M) * K_img,   V'_img = M * V_r + (1 - M) * V_img
  (without a mask, K_r and V_r); text keys and values, and every query, are the target's own.

`attn2` of a dual-attention block fuses with its block. It is image-to-image attention, the very
self-attention that D-Fusion fuses in a UNet; left alone, half of such a block's attention would
read the target's own appearance back in beside the fused joint attention. It gives no mask (it
has no text tokens).

Which blocks (settings `fusion.blocks` and `fusion.mask_blocks`, "lo-hi" inclusive, "" for the
default; no published D-Fusion setting exists for SD 3):
- fused: the second half, N//2 .. N-1 (SD 3.5 Medium: 12-23, Large: 19-37). The release fuses SD
  2.1's mid and up blocks ("3-6" of 0-6), the second half of the network in forward order, where
  the layout the first half has set is rendered; a transformer keeps one token grid throughout, so
  forward order is what carries the meaning over.
- masks: the middle third, N//3 .. 2N//3 - 1 (Medium: 8-15, Large: 12-24). The release reads its
  masks at the 16x16 layers beside SD 2.1's bottleneck (blocks 2 and 4 of 0-6), in the middle of the
  network; in the first blocks the text tokens have barely mixed with the image, and the last
  block's text stream is dropped (`context_pre_only`).

Processors call the layer's own projections, so peft LoRA adapters on them take part as usual.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d_fusion.attention import Fuse, Record, _heads, _merge_heads, blend, processors_installed
from d_fusion.errors import UserError
from d_fusion.injection import _range


def default_fusion_blocks(num_blocks):
    return num_blocks // 2, num_blocks - 1


def default_mask_blocks(num_blocks):
    return num_blocks // 3, max(num_blocks // 3, 2 * num_blocks // 3 - 1)


def block_range(text, field, num_blocks, default):
    """(lo, hi) inclusive from "lo-hi", or `default(num_blocks)` for ""; within the transformer's blocks."""
    if text == "":
        return default(num_blocks)
    lo, hi = _range(text, field)
    if hi >= num_blocks:
        raise UserError(f"config.{field} = {text!r}: this transformer has blocks 0-{num_blocks - 1}")
    return lo, hi


@dataclass(frozen=True)
class JointLayer:
    name: str  # processor name, e.g. transformer_blocks.3.attn.processor (attn2: the image-only one)
    block: int  # the transformer block, 0..N-1 in forward order
    joint: bool  # attn (image and text tokens); False for a dual-attention block's attn2
    mask_layer: bool  # a joint attention of a mask block


def joint_attention_layers(transformer, mask_blocks):
    """Every attention of the transformer (see `JointLayer`); mask_blocks: (lo, hi) inclusive."""
    lo, hi = mask_blocks
    layers = []
    for name in transformer.attn_processors:
        _, block, attention, _ = name.split(".")  # transformer_blocks, i, attn or attn2, processor
        joint = attention == "attn"
        layers.append(JointLayer(name, int(block), joint, joint and lo <= int(block) <= hi))
    return layers


class JointFusionAttnProcessor:
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, fusion=None):
        """hidden_states: (B, N, C) image tokens; encoder_hidden_states: (B, L, C) text tokens (None in attn2)."""
        if attention_mask is not None:
            raise ValueError(f"{self.layer.name}: joint attention takes no attention mask")
        (q, k, v), text = self.project(attn, hidden_states, encoder_hidden_states)
        if isinstance(fusion, Record):
            self.record(q, k, v, text, fusion)
        if isinstance(fusion, Fuse) and (self.layer.block in fusion.k_blocks or self.layer.block in fusion.v_blocks):
            k, v = self.fuse(k, v, fusion)
        if text is not None:  # [image; text] tokens
            q, k, v = (torch.cat([image, words], dim=2) for image, words in zip((q, k, v), text))  # (B, h, N + L, d)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N (+ L), h * d)
        image_out = attn.to_out[1](attn.to_out[0](out[:, : hidden_states.shape[1]]))
        if text is None:
            return image_out
        text_out = out[:, hidden_states.shape[1] :]
        return image_out, text_out if attn.context_pre_only else attn.to_add_out(text_out)

    @staticmethod
    def project(attn, hidden_states, context):
        """(Q, K, V) of the image tokens and of the text tokens (None without them), each (B, h, N, d),
        after the layer's q/k norms."""
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q = q if attn.norm_q is None else attn.norm_q(q)
        k = k if attn.norm_k is None else attn.norm_k(k)
        if context is None:
            return (q, k, v), None
        cq, ck, cv = (_heads(proj(context), attn.heads) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq = cq if attn.norm_added_q is None else attn.norm_added_q(cq)
        ck = ck if attn.norm_added_k is None else attn.norm_added_k(ck)
        return (q, k, v), (cq, ck, cv)

    def record(self, q, k, v, text, record):
        if self.layer.block in record.kv_blocks:
            record.keys[self.layer.name], record.values[self.layer.name] = k, v  # (B_cfg, h, N, d)
        if self.layer.mask_layer and record.keep_masks:
            cond = slice(q.shape[0] // 2, None) if record.cfg else slice(None)
            text_keys = text[1][cond].float()  # (B, h, L, d)
            scores = q[cond].float() @ text_keys.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, h, N, L)
            record.add_probs(scores.softmax(-1).mean(1))  # (B, N, L), over the text keys alone, averaged over heads

    def fuse(self, k, v, fusion):
        """The image tokens' K' and V' (B_cfg, h, N, d), blended with the reference's under the mask."""
        layer, batch = self.layer, k.shape[0]
        k_ref, v_ref = fusion.reference.keys[layer.name], fusion.reference.values[layer.name]
        rows = fusion.reference_rows(batch, k_ref.shape[0])
        grid = int(round(k.shape[2] ** 0.5))
        mask = None if fusion.mask is None else fusion.mask_at(grid, batch)  # (B_cfg, N)
        fusion.fused.append(layer)
        if layer.block in fusion.k_blocks:
            k = blend(k, k_ref[rows], mask)
        if layer.block in fusion.v_blocks:
            v = blend(v, v_ref[rows], mask)
        return k, v


@contextlib.contextmanager
def joint_fusion_processors(transformer, mask_blocks):
    """Put a `JointFusionAttnProcessor` on every attention; the transformer's own come back after."""
    layers = joint_attention_layers(transformer, mask_blocks)
    with processors_installed(transformer, {layer.name: JointFusionAttnProcessor(layer) for layer in layers}):
        yield layers
