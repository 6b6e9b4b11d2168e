"""What the processor design costs: one CFG UNet pass with scaled_dot_product_attention everywhere
(our plain path), with our recording pass (explicit probabilities only at the mask layers), and
with explicit probabilities at every layer (diffusers' `AttnProcessor`, as the release computed
attention).

    python bench/bench_attention.py                       # tiny model, CPU
    python bench/bench_attention.py --size sd21 --batch 8 # SD 2.1 base architecture, GPU, fp16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

from bench.common import alternate, build_models, parse_args  # noqa: E402
from d_fusion.attention import Record, fusion_processors  # noqa: E402


class Either:
    """Our processor, or diffusers' explicit-probabilities `AttnProcessor` when called with explicit=True,
    so that all variants alternate on the same UNet."""

    def __init__(self, ours):
        self.ours, self.explicit = ours, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fusion=None, explicit=False):
        if explicit:
            return self.explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.ours(attn, hidden_states, encoder_hidden_states, attention_mask, temb, fusion=fusion)


def main():
    args = parse_args(__doc__, batch=(int, 4, "images per pass (x2 with CFG)"))
    models = build_models(args.size, args.device, args.torch_dtype)
    unet = models.unet
    torch.manual_seed(0)
    latents = torch.randn((2 * args.batch,) + models.latent_shape, device=models.device, dtype=models.dtype)
    embeds = torch.randn(
        2 * args.batch, 77, unet.config.cross_attention_dim, device=models.device, dtype=models.dtype
    )

    @torch.no_grad()
    def forward(**attention_kwargs):
        unet(latents, 500, encoder_hidden_states=embeds, cross_attention_kwargs=attention_kwargs or None)

    with fusion_processors(unet) as layers:
        fused_blocks = frozenset(layer.block for layer in layers)
        ours = unet.attn_processors
        unet.set_attn_processor({name: Either(processor) for name, processor in ours.items()})
        runs = {
            "sdpa (plain)": forward,
            "record (K/V + mask probs)": lambda: forward(fusion=Record(fused_blocks, keep_masks=True, cfg=True)),
            "explicit probs everywhere": lambda: forward(explicit=True),
        }
        times = alternate(runs, args.repeats, args.device)
        unet.set_attn_processor(ours)

    print(f"attention size={args.size} device={args.device} dtype={args.dtype} batch={args.batch} (x2 CFG)")
    base = times["sdpa (plain)"]
    for name, seconds in times.items():
        print(f"  {name:28s} {seconds * 1000:8.1f} ms  ({seconds / base:.2f}x plain)")


if __name__ == "__main__":
    main()
