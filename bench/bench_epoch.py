"""One epoch of the release's full-version shape, stage by stage: today's settings against the new defaults.

    python bench/bench_epoch.py                                 # tiny model, CPU, fp32, 1 thread, 3 prompts
    python bench/bench_epoch.py --size sd21 --device cuda       # SD 2.1 base architecture, GPU, fp16

The epoch is the loop's own (d_fusion/stages.py, files written to a scratch folder): the first
`--prompts` prompts of template1_train.json x 8 batches x 2 samples, 20 DDIM steps, CFG; pairs from
fixed per-sample scores; fusion in batches of 8 targets; DPO on the (target, base) pairs, 2 inner
epochs, every timestep. "old" is today's settings (OLD below) and today's training loop (each
(pair, timestep) alone through the UNet with its reference, in every inner epoch: the loop the
tests check the trainer against, tests/test_trainer.py), "new" the config's defaults; both make the same samples, pairs and timesteps from the same LoRA
start (the script prints how far their samples, targets and trained weights differ). Runs
alternate (old, new, old, new, ...); each stage's time is the best of `--repeats` (the first run
of each warms up, and on a shared machine the best is the least disturbed). Throughput: images/s (sampling),
targets/s (fusion), pair-timesteps/s (training); peak memory per stage on a GPU (the process's
max RSS on the CPU); on a GPU the fraction of `--peak-tflops` reached, from the FLOPs of one UNet
row (counted by torch's FlopCounterMode) times the rows each stage runs (a training row with
gradients counts as 2 forwards: the frozen weights need no weight gradients). Last line:
`epoch ratio X training ratio Y` (new / old wall time).
"""

import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import build_models, parse_args, synchronize  # noqa: E402
from config.config import get_config  # noqa: E402
from d_fusion.datadir import ExperimentDir  # noqa: E402
from d_fusion.prompts import read_prompt_file  # noqa: E402
from d_fusion.sampling import negative_conditioning  # noqa: E402
from d_fusion.stages import Run, check_fusion_inputs, fuse_epoch, load_pairs, make_trainer, sample_epoch  # noqa: E402
from tests.test_trainer import one_row_at_a_time  # noqa: E402

# today's settings, where the new defaults differ: one sampling batch per UNet call, two UNet calls
# per fused step; today's training is the one-row loop (`one_row_at_a_time`)
OLD = {"sample.compute_batch_size": 2, "fusion.one_call": False}
TRAINING = ("train.compute_batch_size", "train.reference_batch_size")  # the new training's batching
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
STAGES = ("sampling", "fusion", "training")


def epoch_config(args, overrides):
    config = get_config("release_full")
    config.mixed_precision = MIXED_PRECISION[args.dtype]
    config.prompt_file = ""  # the prompts are passed to Run.build
    if args.size == "tiny":  # the random tiny model attends almost uniformly: the tiny preset's threshold
        config.mask_thr_file, config.mask_thr = "", 0.014
    for name, value in overrides.items():
        block, field = name.split(".")
        config[block][field] = value
    return config


def setting_overrides(config, names):
    return {name: config[name.split(".")[0]][name.split(".")[1]] for name in names}


class Epoch:
    """One variant's epoch in a fresh scratch folder; each stage timed and its outputs kept."""

    def __init__(self, config, today, models, trainer, prompts, scores):
        self.config, self.today, self.models, self.trainer = config, today, models, trainer
        self.prompts, self.scores = prompts, scores
        self.scratch = tempfile.TemporaryDirectory()
        self.experiment = ExperimentDir(self.scratch.name, "bench")
        self.run = Run.build(config, models, self.experiment, prompts, check_fusion_inputs(config, prompts))

    def sampling(self):
        sample_epoch(self.run, 0)

    def fusion(self):
        fuse_epoch(self.run, 0, self.scores)

    def training(self):
        self.trainer.train = self.config.train
        pairs = load_pairs(self.models, self.experiment.epoch(0))
        if self.config is self.today:
            one_row_at_a_time(self.trainer, pairs, 0)
        else:
            self.trainer.train_pairs(pairs, 0)


def timed(run, device):
    """(seconds, peak GPU memory in GiB or None) of run()."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None
    return seconds, peak


def unet_row_flops(models):
    """FLOPs of one UNet forward of one row."""
    latents = torch.zeros(1, *models.latent_shape, device=models.device, dtype=models.dtype)
    text = negative_conditioning(models).unet_kwargs(models.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models.unet(latents, 500, **text)
    return counter.get_total_flops()


def stage_rows(config, num_samples, old):
    """Forward-equivalent UNet rows of each stage (CFG doubles every row)."""
    steps, cfg = config.sample.num_steps, 2 if config.sample.cfg else 1
    targets = num_samples // 2
    pair_steps = config.train.num_inner_epochs * targets * steps  # every timestep trained (fraction 1)
    reference_steps = pair_steps if old else targets * steps  # the reference once per epoch (beta 0)
    return dict(
        sampling=num_samples * steps * cfg,
        fusion=(targets + targets // 2) * steps * cfg,
        training=2 * cfg * (2 * pair_steps + reference_steps),
    )


def max_difference(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def main():
    args = parse_args(
        __doc__,
        prompts=(int, 3, "prompts of template1_train.json (the release's full version: 40)"),
        peak_tflops=(float, 989.0, "the chip's dense fp16 peak (H200 SXM: 989)"),
    )
    args.repeats = max(1, args.repeats)
    models = build_models(args.size, args.device, args.torch_dtype)
    prompts = read_prompt_file("config/prompt/template1_train.json")[: args.prompts]
    new_config = epoch_config(args, {})
    configs = dict(old=epoch_config(args, OLD), new=new_config)
    trainer = make_trainer(new_config, models)  # LoRA on the UNet, as the loop samples with it
    start = copy.deepcopy(trainer.state_dict())  # its tensors share the live LoRA weights' storage
    num_samples = len(prompts) * new_config.sample.batch_size * new_config.sample.num_batches_per_epoch
    scores = torch.rand(num_samples, generator=torch.Generator().manual_seed(0)).tolist()

    times = {(name, stage): [] for name in configs for stage in STAGES}
    peaks, outputs = {}, {}
    for repeat in range(args.repeats):
        for name, config in configs.items():
            trainer.load_state_dict(start)
            epoch = Epoch(config, configs["old"], models, trainer, prompts, scores)
            for stage in STAGES:
                seconds, peak = timed(getattr(epoch, stage), args.device)
                times[name, stage].append(seconds)
                peaks[name, stage] = peak
            epoch_dir = epoch.experiment.epoch(0)
            outputs[name] = (
                epoch_dir.sampled.load_trajectories(range(num_samples)).latents,
                epoch_dir.injected.load_trajectories(range(num_samples // 2)).latents,
                [p.detach().clone() for p in trainer.params],
            )
            epoch.scratch.cleanup()
    seconds = {key: min(values) for key, values in times.items()}

    flops = unet_row_flops(models)
    on_gpu = torch.device(args.device).type == "cuda"
    units = dict(sampling=(num_samples, "images/s"), fusion=(num_samples // 2, "targets/s"))
    pair_steps = new_config.train.num_inner_epochs * (num_samples // 2) * new_config.sample.num_steps
    units["training"] = (pair_steps, "pair-timesteps/s")
    print(
        f"epoch size={args.size} device={args.device} dtype={args.dtype} threads={args.threads} repeats={args.repeats}: "
        f"{len(prompts)} prompts x {num_samples // len(prompts)} samples, {num_samples // 2} pairs, "
        f"{new_config.sample.num_steps} steps, {new_config.train.num_inner_epochs} inner epochs; "
        f"old = {OLD} and the one-row training loop, new = {setting_overrides(new_config, [*OLD, *TRAINING])}; "
        f"UNet row {flops / 1e9:.2f} GFLOP"
    )
    for stage in STAGES:
        count, unit = units[stage]
        parts = []
        for name, config in configs.items():
            part = f"{name} {seconds[name, stage]:8.3f} s {count / seconds[name, stage]:8.2f} {unit}"
            if on_gpu:
                rows = stage_rows(config, num_samples, old=name == "old")[stage]
                fraction = rows * flops / seconds[name, stage] / (args.peak_tflops * 1e12)
                part += f" {peaks[name, stage]:6.2f} GiB peak {100 * fraction:5.1f}% of fp16 peak"
            parts.append(part)
        ratio = seconds["new", stage] / seconds["old", stage]
        print(f"  {stage:9s} " + " | ".join(parts) + f" | ratio {ratio:.3f}")
    if not on_gpu:
        print(f"  process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    old, new = outputs["old"], outputs["new"]
    print(
        f"  max abs difference new - old: samples {max_difference(old[0], new[0]):.2e}, targets "
        f"{max_difference(old[1], new[1]):.2e}, LoRA weights {max_difference(old[2], new[2]):.2e}"
    )
    total = {name: sum(seconds[name, stage] for stage in STAGES) for name in configs}
    print(f"epoch ratio {total['new'] / total['old']:.3f} training ratio {seconds['new', 'training'] / seconds['old', 'training']:.3f}")


if __name__ == "__main__":
    main()
