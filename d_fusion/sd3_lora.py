"""LoRA on SD 3 / 3.5's transformer (docs/METHOD.md §7 on a joint-attention model).

The adapters sit on every attention projection of the joint blocks: the image stream's `to_q`,
`to_k`, `to_v`, `to_out.0` (in `attn2` of SD 3.5's dual-attention blocks too) and the text
stream's `add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out` (the last block has none: its
text output is dropped). They are saved in the format `StableDiffusion3Pipeline.load_lora_weights`
reads, and read back for resuming with `checkpoints.load_lora(transformer, path, TRANSFORMER_PREFIX)`.
"""

from diffusers import StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from d_fusion.datadir import CheckpointDir
from d_fusion.trainer import add_lora

SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TRANSFORMER_PREFIX = "transformer."  # how load_lora_weights names the transformer's LoRA keys


def add_sd3_lora(transformer, rank, seed=0):
    """LoRA adapters on the transformer's attention projections (B = 0); returns the trainable params (fp32)."""
    return add_lora(transformer, rank, seed, SD3_LORA_TARGETS)


def save_sd3_lora(transformer, folder):
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=CheckpointDir.LORA_WEIGHTS,
        safe_serialization=True,
    )
