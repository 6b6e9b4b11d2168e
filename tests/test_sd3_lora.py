"""LoRA on the SD 3.5 transformer: every attention projection, saved (as checkpoints save it) as
StableDiffusion3Pipeline loads it."""

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from d_fusion.checkpoints import load_lora, lora_prefix, save_lora
from d_fusion.datadir import CheckpointDir
from d_fusion.families import StableDiffusion3Family
from d_fusion.trainer import add_lora
from tests.test_joint_attention import inputs


def lora_transformer(tiny_sd3_dir, seed=None):
    """The tiny SD 3.5 transformer with rank-2 adapters; with a seed, random (non-zero) LoRA weights."""
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer").eval()
    params = add_lora(transformer, 2, 0, StableDiffusion3Family.lora_targets)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return transformer, params


def adapted(transformer):
    return {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A" in name}


def test_every_attention_projection_gets_an_adapter(tiny_sd3_dir):
    transformer, params = lora_transformer(tiny_sd3_dir)
    names = adapted(transformer)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    block = "transformer_blocks.0"  # a dual-attention block: joint attn and image-only attn2
    for target in StableDiffusion3Family.lora_targets:
        assert f"{block}.attn.{target}" in names
    assert {f"{block}.attn2.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0")} <= names
    assert "transformer_blocks.3.attn.to_add_out" not in names  # the last block drops its text
    assert len(names) == 4 * 8 - 1 + 2 * 4  # 4 joint attentions, 2 attn2


def test_saved_lora_loads_in_the_pipeline_and_for_resuming(tiny_sd3_dir, tmp_path):
    transformer, _ = lora_transformer(tiny_sd3_dir, seed=0)
    save_lora(StableDiffusion3Family, StableDiffusion3Family.lora_state_dict(transformer), str(tmp_path))
    with torch.no_grad():
        ours = transformer(**inputs()).sample
        pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
        base = pipeline.transformer(**inputs()).sample
        pipeline.load_lora_weights(str(tmp_path))
        theirs = pipeline.transformer(**inputs()).sample
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    resumed, _ = lora_transformer(tiny_sd3_dir)
    load_lora(resumed, str(tmp_path / CheckpointDir.LORA_WEIGHTS), lora_prefix(StableDiffusion3Family))
    for name, value in transformer.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value)
