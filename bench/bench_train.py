"""One DPO training step: time and peak memory, with and without gradient checkpointing.

    python bench/bench_train.py                  # tiny model, CPU, fp32, 1 thread
    python bench/bench_train.py --size sd21      # SD 2.1 base architecture (random weights), GPU, fp16

A step is what `Trainer.train_pairs` does for one (target, base) pair at one timestep: the LoRA
policy's CFG forward with gradients and the reference's (adapters disabled) on both trajectories,
the backward pass, grad-norm clipping and one AdamW step. Frozen weights in the bench dtype, LoRA
in fp32, autocast through accelerate as in training. Runs alternate in one process.
"""

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import alternate, build_models, parse_args  # noqa: E402
from config.config import get_config  # noqa: E402
from d_fusion.sampling import Trajectories, encode_prompts  # noqa: E402
from d_fusion.stages import make_trainer  # noqa: E402
from d_fusion.trainer import PreferencePairs  # noqa: E402

PROMPT = "a cat playing chess"
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def random_pairs(models, steps):
    """One (target, base) pair of random trajectories: timing does not depend on the values."""
    models.scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, steps + 1, *models.latent_shape, generator=generator)
    trajectories = Trajectories(latents, torch.zeros(2, steps), models.scheduler.timesteps.cpu())
    return PreferencePairs(trajectories[0:1], trajectories[1:2], encode_prompts(models, [PROMPT]))


def peak_memory(run, device):
    """Peak GPU memory of one run (GiB), or the process's peak resident memory so far on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() / 2**30
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    args = parse_args(__doc__, steps=(int, 20, "DDIM steps of the trajectories"), rank=(int, 4, "LoRA rank"))
    models = build_models(args.size, args.device, args.torch_dtype)
    config = get_config()
    config.mixed_precision = MIXED_PRECISION[args.dtype]
    config.sample.num_steps = args.steps
    config.train.lora_rank = args.rank
    config.train.num_inner_epochs = 1
    config.train.timestep_fraction = 1 / args.steps  # one timestep of one pair: one optimizer step
    trainer = make_trainer(config, models)
    pairs = random_pairs(models, args.steps)

    def step(checkpointing):
        def run():
            if checkpointing:
                models.unet.enable_gradient_checkpointing()
            else:
                models.unet.disable_gradient_checkpointing()
            trainer.train_pairs(pairs, epoch=0)

        return run

    runs = {"plain": step(False), "grad checkpointing": step(True)}
    times = alternate(runs, args.repeats, args.device)
    memory = {name: peak_memory(run, args.device) for name, run in runs.items()}
    unit = "GiB GPU peak" if torch.device(args.device).type == "cuda" else "GiB process max RSS"
    print(
        f"DPO step size={args.size} device={args.device} dtype={args.dtype} steps={args.steps} "
        f"lora_rank={args.rank} cfg=True ({sum(p.numel() for p in trainer.params)} LoRA parameters)"
    )
    for name in runs:
        print(f"  {name:20s} {times[name]:.3f} s  {memory[name]:.2f} {unit}")


if __name__ == "__main__":
    main()
