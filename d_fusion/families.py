"""Model families (docs/METHOD.md §9, §10): the one place that knows how the model families differ.

    family   pipeline (model_index.json)   text conditioning of the UNet
    sd       StableDiffusionPipeline       CLIP's last hidden state (B, 77, D): SD 1.x (D = 768), SD 2.x
                                           (D = 1024), epsilon or v-prediction (the scheduler's
                                           prediction_type), 512 or 768 px (the UNet's sample_size)
    sdxl     StableDiffusionXLPipeline     both CLIPs' penultimate hidden states, concatenated (B, 77, 2048),
                                           and added_cond_kwargs: text_embeds, the second CLIP's pooled
                                           projection (B, 1280), and time_ids (B, 6) = (original size,
                                           crop top-left, target size); the empty prompt is zeros when the
                                           pipeline's force_zeros_for_empty_prompt is set (SDXL base)
    sd3      StableDiffusion3Pipeline      a transformer, not a UNet (d_fusion/sd3.py): both CLIPs' penultimate
                                           states, zero-padded to T5's width, then T5's L tokens (zeros
                                           without T5): (B, 77 + L, D), and both CLIPs' pooled projections
                                           (B, P); the stochastic flow step (`sample.noise_level`); fusion
                                           of the joint attention (`fusion.blocks`, `fusion.mask_blocks`)

The UNet families share everything else (DDIM with log-probabilities, the block numbering of
fusion, masks from the cross-attention of the first tokenizer's tokens, LoRA, training): the
sampler, fusion and the trainer see only a `Conditioning` and `Conditioning.unet_kwargs`. What SD 3
does otherwise, the stages, the trainer, the checkpoints and held-out reach through
`models.family`: `load`, `encode`, `negative`, `solver` (the step that `sampling.Denoising` and
`trainer.Policy` take), `injection_on_blocks`, `fused_sampling`, `check_fusion`, the LoRA
targets, `lora_state_dict` and the denoiser's name (LoRA keys' prefix, `save_lora_weights`'
argument). The modules these methods call import `Conditioning` from here, so the methods import
them when called.
"""

from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict

from d_fusion.errors import UserError


@dataclass
class Conditioning:
    """The text conditioning of a batch, row b for sample b (index, expand and concatenate it as a batch)."""

    embeds: torch.Tensor  # (B, 77, D): the UNet's encoder_hidden_states (SD 3: (B, 77 + L, D))
    pooled: torch.Tensor | None = None  # (B, P): SDXL's text_embeds, SD 3's pooled_projections
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's size and crop conditioning

    def _map(self, function):
        return Conditioning(*(None if t is None else function(t) for t in (self.embeds, self.pooled, self.time_ids)))

    def __getitem__(self, rows):
        """Rows `rows` (a slice, a list or a tensor of indices) as a Conditioning."""
        return self._map(lambda t: t[rows])

    def __len__(self):
        return self.embeds.shape[0]

    @property
    def num_tokens(self):
        return self.embeds.shape[1]

    def expand(self, batch):
        """A one-row conditioning repeated `batch` times (a view)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device):
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts):
        first = parts[0]
        return Conditioning(
            *(
                None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])
                for name in ("embeds", "pooled", "time_ids")
            )
        )

    def unet_kwargs(self, dtype):
        """The UNet's text inputs in `dtype`."""
        kwargs = dict(encoder_hidden_states=self.embeds.to(dtype))
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = dict(text_embeds=self.pooled.to(dtype), time_ids=self.time_ids.to(dtype))
        return kwargs


def _token_ids(tokenizer, prompts, device):
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class UNetFamily:
    """What SD 1.x / 2.x and SDXL share: a UNet, DDIM, fusion of its self-attention (inject_l's blocks)."""

    denoiser = "unet"  # the models' attribute that denoises; LoRA keys and save_lora_weights are named after it
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    @classmethod
    def load(cls, model, revision, mixed_precision, dev_id, index):
        from d_fusion.models import load_unet_models

        return load_unet_models(cls, model, revision, mixed_precision, dev_id, index)

    @staticmethod
    def lora_state_dict(unet):
        """The LoRA weights as `save_lora_weights` takes them (diffusers' names of the UNet's layers)."""
        from d_fusion.trainer import lora_state_dict

        return lora_state_dict(unet)

    @staticmethod
    def solver():
        from d_fusion.sampling import DDIM

        return DDIM

    @staticmethod
    def fused_sampling(models, batch, negative, settings):
        """`fusion.fused_sampling` of a FusionBatch with FusionSettings `settings`."""
        from d_fusion.fusion import fused_sampling

        return fused_sampling(models.unet, models.scheduler, batch, negative, settings)

    @staticmethod
    def injection_on_blocks(models, injection, mask_resolution):
        """inject_l's block ranges in the UNet's block numbers (`injection.Injection.on_blocks`); a mask grid
        the UNet lacks fails here."""
        from d_fusion.attention import attention_layers, block_parts

        layers = attention_layers(models.unet, mask_resolution)
        return injection.on_blocks(block_parts(layers), len({layer.block for layer in layers}))

    @staticmethod
    def check_fusion(models, settings):
        """SD 3's block settings fail at start-up on a UNet."""
        if settings.blocks or settings.mask_blocks:
            raise UserError(
                "config.fusion.blocks and fusion.mask_blocks apply to SD 3 only: a UNet fuses inject_l's blocks "
                "and takes its masks at fusion.mask_resolution; leave them empty"
            )


class StableDiffusionFamily(UNetFamily):
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden state."""

    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_parts = ("text_encoder", "tokenizer")

    @staticmethod
    @torch.no_grad()
    def encode(models, prompts):
        return Conditioning(models.text_encoder(_token_ids(models.tokenizer, prompts, models.device))[0])

    @classmethod
    def negative(cls, models):
        """The unconditional conditioning of CFG: the empty prompt's."""
        return cls.encode(models, [""])

    @staticmethod
    def pipeline_parts(models):
        return dict(text_encoder=models.text_encoder, tokenizer=models.tokenizer, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)


class StableDiffusionXLFamily(UNetFamily):
    """SDXL: two CLIP text encoders (the second with a projection), pooled embeddings and time ids."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    @staticmethod
    def time_ids(models, batch):
        """(original height, width, crop top, left, target height, width): the image size, uncropped: (B, 6)."""
        size = models.resolution
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=models.device).expand(batch, 6)

    @classmethod
    @torch.no_grad()
    def encode(cls, models, prompts):
        hidden = []
        for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
            output = encoder(_token_ids(tokenizer, prompts, models.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # the penultimate layer, as StableDiffusionXLPipeline takes it
        pooled = output.text_embeds  # the second encoder's projection of its end token: (B, P)
        return Conditioning(torch.cat(hidden, dim=-1), pooled, cls.time_ids(models, len(prompts)))

    @classmethod
    def negative(cls, models):
        """The empty prompt's conditioning, or zeros when the pipeline forces them (SDXL base)."""
        empty = cls.encode(models, [""])
        if models.force_zeros_for_empty_prompt:
            return Conditioning(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled), empty.time_ids)
        return empty

    @staticmethod
    def pipeline_parts(models):
        return dict(text_encoder=models.text_encoder, tokenizer=models.tokenizer, text_encoder_2=models.text_encoder_2,
                    tokenizer_2=models.tokenizer_2, force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt)


class StableDiffusion3Family:
    """SD 3 / 3.5 (docs/METHOD.md §10): a joint-attention transformer, flow matching, CLIPs and T5."""

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    # every attention projection, image stream and text stream (attn2 of SD 3.5's dual-attention blocks too)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @staticmethod
    def load(model, revision, mixed_precision, dev_id, index):
        from d_fusion.sd3 import load_sd3_models

        return load_sd3_models(model, revision, mixed_precision, dev_id)

    @staticmethod
    def encode(models, prompts):
        from d_fusion.sd3 import encode_sd3_prompts

        return encode_sd3_prompts(models, prompts)

    @classmethod
    def negative(cls, models):
        """The pipeline's default negative: the empty prompt's."""
        return cls.encode(models, [""])

    @staticmethod
    def lora_state_dict(transformer):
        """The LoRA weights under peft's names, as diffusers' SD 3 LoRA training saves them (its UNet
        renaming would garble the transformer's)."""
        return get_peft_model_state_dict(transformer)

    @staticmethod
    def solver():
        from d_fusion.sd3 import FLOW

        return FLOW

    @staticmethod
    def fused_sampling(models, batch, negative, settings):
        """`sd3_fusion.fused_flow_sampling` of a FusionBatch with FusionSettings `settings`."""
        from d_fusion.sd3_fusion import fused_flow_sampling

        return fused_flow_sampling(models, batch, negative, settings)

    @staticmethod
    def injection_on_blocks(models, injection, mask_resolution):
        """The injection as it is: SD 3 fuses fusion.blocks, not inject_l's UNet blocks (`sd3_fusion.fusion_plan`)."""
        return injection

    @staticmethod
    def check_fusion(models, settings):
        """fusion.blocks and fusion.mask_blocks within the transformer's blocks."""
        from d_fusion.sd3_fusion import fusion_plan

        fusion_plan(settings, len(models.transformer.transformer_blocks))

    @staticmethod
    def pipeline_parts(models):
        return dict(text_encoder=models.text_encoder, tokenizer=models.tokenizer, text_encoder_2=models.text_encoder_2,
                    tokenizer_2=models.tokenizer_2, text_encoder_3=models.text_encoder_3, tokenizer_3=models.tokenizer_3)


# model_index.json's _class_name -> family
FAMILIES = {
    family.pipeline_class.__name__: family
    for family in (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family)
}
