"""The fusion stage's sampling against the release's three passes, on the same UNet, alternating.

Ours: per step 1.5 UNet rows per target (the distinct references, each guiding two, and the
targets), in one UNet call (the references' step i + 1 with the targets' step i, the default) or
in two (`one_call=False`: the references' step, then the targets'). The release: per target and
step, its reference regenerated, its base regenerated, and the target: 3 passes per target
(batched here like ours, in separate calls, so that only the number of passes differs). All make the same targets; the script checks it and prints the ratio
ours (one call) / release (goal <= 0.5) and one call / two calls.

    python bench/bench_fusion.py                                  # tiny model, CPU, 1 thread
    python bench/bench_fusion.py --size sd21 --targets 8          # SD 2.1 base architecture, GPU, fp16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import alternate, build_models, parse_args  # noqa: E402
from d_fusion.fusion import FusionBatch, FusionSettings, fused_sampling  # noqa: E402
from d_fusion.injection import parse_injection  # noqa: E402
from d_fusion.masks import PromptObjects, item_selection  # noqa: E402
from d_fusion.sampling import SamplerSettings, encode_prompts, negative_conditioning, sample_generators  # noqa: E402

PROMPT = "a dog driving a car"
OBJECTS = {PROMPT: PromptObjects((1, 4), (0.03, 0.01))}  # the release's item and mask files


def main():
    args = parse_args(
        __doc__, targets=(int, 8, "targets per batch (even: each reference guides two)"), steps=(int, 20, "DDIM steps")
    )
    models = build_models(args.size, args.device, args.torch_dtype)
    references = args.targets // 2
    num_samples = 2 * args.targets  # references come first, bases after them
    base_indices = list(range(references, references + args.targets))
    embeds = encode_prompts(models, [PROMPT])
    negative = negative_conditioning(models)
    weights, thresholds = item_selection(models.tokenizer, [PROMPT], OBJECTS, embeds.num_tokens)
    injection = parse_injection("T,T,T,T,T,F", f"0-{args.steps - 2}," * 5, "3-6," * 5)

    def sample(reference_indices, base_pass, one_call):
        """Targets of every base; reference_indices[g] guides the targets 2g and 2g + 1 (or g when repeated)."""
        rows = len(reference_indices)
        guide = torch.arange(args.targets) // (args.targets // rows)
        settings = FusionSettings(injection, SamplerSettings(args.steps, 1.0, 5.0), base_pass=base_pass, one_call=one_call)
        batch = FusionBatch(
            embeds.expand(rows),
            sample_generators(0, 0, num_samples, reference_indices),
            sample_generators(0, 0, num_samples, base_indices),
            guide,
            weights.expand(rows, -1, -1),
            thresholds.expand(rows, -1),
        )
        return fused_sampling(models.unet, models.scheduler, batch, negative, settings)

    distinct = list(range(references))
    runs = {
        "ours, one call": lambda: sample(distinct, base_pass=False, one_call=True),
        "ours, two calls": lambda: sample(distinct, base_pass=False, one_call=False),
        "release (3 passes)": lambda: sample([r for r in distinct for _ in range(2)], base_pass=True, one_call=False),
    }
    targets = {name: run().targets.latents for name, run in runs.items()}
    difference = max((latents - targets["release (3 passes)"]).abs().max().item() for latents in targets.values())
    times = alternate(runs, args.repeats, args.device)
    ratio = times["ours, one call"] / times["release (3 passes)"]
    one_call = times["ours, one call"] / times["ours, two calls"]
    print(
        f"fusion size={args.size} device={args.device} dtype={args.dtype} threads={args.threads} "
        f"targets={args.targets} steps={args.steps} repeats={args.repeats}"
    )
    for name, seconds in times.items():
        print(f"  {name:20s} {seconds:8.3f} s  {args.targets / seconds:6.2f} targets/s")
    print(
        f"  ratio {ratio:.3f} (goal <= 0.5), one call / two calls {one_call:.3f}; "
        f"targets' max abs difference {difference:.2e}"
    )


if __name__ == "__main__":
    main()
