"""Our trajectory sampler vs diffusers' StableDiffusionPipeline: same model, DDIM steps, batch, CFG.

    python bench/bench_sampling.py                      # tiny model, CPU, 1 thread
    python bench/bench_sampling.py --size sd21 --batch 8 # SD 2.1 base architecture, GPU, fp16

Both produce latents (no VAE decode, no safety checker); ours also records every x_t and log-prob.
Runs alternate in one process; the printed ratio is ours / pipeline (goal <= 1.05).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, build_models, parse_args  # noqa: E402
from d_fusion.sampling import SamplerSettings, encode_prompts, negative_conditioning, sample_generators, sample_trajectories  # noqa: E402

PROMPT = "a cat playing chess"


def main():
    args = parse_args(__doc__, batch=(int, 4, "images per batch"), steps=(int, 20, "DDIM steps"))
    models = build_models(args.size, args.device, args.torch_dtype)
    pipeline = models.pipeline()
    indices = range(args.batch)

    def ours():
        sample_trajectories(
            models,
            encode_prompts(models, [PROMPT] * args.batch),
            negative_conditioning(models),
            sample_generators(42, 0, args.batch, indices),
            SamplerSettings(args.steps, eta=1.0, guidance_scale=5.0),
            progress=False,
        )

    def diffusers_pipeline():
        pipeline(
            [PROMPT] * args.batch,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            eta=1.0,
            generator=sample_generators(42, 0, args.batch, indices),
            output_type="latent",
        )

    times = alternate({"ours": ours, "pipeline": diffusers_pipeline}, args.repeats, args.device)
    print(f"sampling size={args.size} device={args.device} dtype={args.dtype} batch={args.batch} steps={args.steps}")
    print(f"  ours     {times['ours']:.3f} s  ({args.batch / times['ours']:.2f} images/s)")
    print(f"  pipeline {times['pipeline']:.3f} s  ({args.batch / times['pipeline']:.2f} images/s)")
    print(f"  ratio ours/pipeline = {times['ours'] / times['pipeline']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
