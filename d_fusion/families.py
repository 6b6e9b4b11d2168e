"""Model families (docs/METHOD.md §9): the one place that knows how the Stable Diffusion UNets differ.

    family   pipeline (model_index.json)   text conditioning of the UNet
    sd       StableDiffusionPipeline       CLIP's last hidden state (B, 77, D): SD 1.x (D = 768), SD 2.x
                                           (D = 1024), epsilon or v-prediction (the scheduler's
                                           prediction_type), 512 or 768 px (the UNet's sample_size)
    sdxl     StableDiffusionXLPipeline     both CLIPs' penultimate hidden states, concatenated (B, 77, 2048),
                                           and added_cond_kwargs: text_embeds, the second CLIP's pooled
                                           projection (B, 1280), and time_ids (B, 6) = (original size,
                                           crop top-left, target size); the empty prompt is zeros when the
                                           pipeline's force_zeros_for_empty_prompt is set (SDXL base)

Everything else (DDIM with log-probabilities, the block numbering of fusion, masks from the
cross-attention of the first tokenizer's tokens, LoRA, training) is the same for every family:
the sampler, fusion and the trainer see only a `Conditioning` and `Conditioning.unet_kwargs`.
"""

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


@dataclass
class Conditioning:
    """The text conditioning of a batch, row b for sample b (index, expand and concatenate it as a batch)."""

    embeds: torch.Tensor  # (B, 77, D): the UNet's encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P): SDXL's text_embeds
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


class StableDiffusionFamily:
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


class StableDiffusionXLFamily:
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


# model_index.json's _class_name -> family
FAMILIES = {family.pipeline_class.__name__: family for family in (StableDiffusionFamily, StableDiffusionXLFamily)}
