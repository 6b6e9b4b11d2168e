"""The paper's comparison in miniature, on the shapes world.

    python bench/study_shapes.py [--seeds 0,1,2] [--epochs 2] [--out data/study_shapes]

For each seed, three runs start from the shipped model (assets/shapes) with the `shapes` config
on 12 prompts of config/prompt/shapes_train.json (of each of its 6 object pairs, "A to the left of
B" and "a small B and a big A": the families the model gets wrong most), 8 samples per prompt,
the shapes reward:

    dfusion   DPO on D-Fusion pairs: target preferred over base (the method)
    ordinary  DPO on ordinary pairs: reference preferred over base (the paper's baseline:
              well- and poorly-aligned samples that are not visually consistent)
    ddpo      DDPO with the same reward, on the samples and the targets

Then the base model and each run's last checkpoint sample the held-out prompts
(config/prompt/shapes_test.json: object pairs no training saw) with the same noise (image j of the
evaluation is seeded `EVAL_SEED + j` for every model), and the script prints and writes to
<out>/study.json and <out>/study.md, per method over all seeds: mean reward with a 95% interval,
the fraction of fully aligned images, the win rate and mean difference against the base model on
the same noise; and, for the pairs the DPO runs trained on, their visual consistency: the mean
pixel distance of target to base and of reference to base.

Resumable: each run continues from its own checkpoints, and held-out results already on disk with
the same settings are reused; rerun the same command after an interruption.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.config import get_config  # noqa: E402
from d_fusion.datadir import ExperimentDir, HeldoutDir, checkpoints_in, write_json  # noqa: E402
from d_fusion.experiment import run_experiment  # noqa: E402
from d_fusion.heldout import BASE, HeldoutEvaluator  # noqa: E402
from d_fusion.logs import setup_logging  # noqa: E402
from d_fusion.prompts import read_prompt_file  # noqa: E402

METHODS = {
    "dfusion": dict(algorithm="dpo", preferred="target"),
    "ordinary": dict(algorithm="dpo", preferred="reference"),
    "ddpo": dict(algorithm="ddpo", preferred="target"),
}
EVAL_SEED = 100_000  # far from every training seed's sample seeds


def study_config(args, seed, method):
    config = get_config("shapes")
    config.save_path = args.out
    config.exp_name = f"{method}_seed{seed}"
    config.seed = seed
    config.prompt_file = os.path.join(args.out, "train_prompts.json")
    config.train.num_epochs = args.epochs
    config.train.save_interval = args.epochs
    config.train.learning_rate = args.learning_rate
    config.train.timestep_fraction = args.timestep_fraction
    config.train.num_inner_epochs = args.inner_epochs
    config.train.algorithm = METHODS[method]["algorithm"]
    config.train.preferred = METHODS[method]["preferred"]
    config.fusion.mask_images = "last"
    config.heldout.images_per_prompt = args.images_per_prompt
    config.threads = args.threads
    return config


def eval_config(args):
    config = study_config(args, EVAL_SEED, "dfusion")
    config.seed = EVAL_SEED
    return config


def last_checkpoint(config):
    found = checkpoints_in(ExperimentDir(config.save_path, config.exp_name).checkpoints)
    return found[-1]


def interval95(values):
    """Mean and half-width of its normal 95% interval."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def pixel_distance(a, b):
    return float(np.abs(np.asarray(Image.open(a), dtype=float) - np.asarray(Image.open(b), dtype=float)).mean())


def consistency(config):
    """Mean pixel distance (0-255) of target to base and of reference to base, over the run's pairs."""
    experiment = ExperimentDir(config.save_path, config.exp_name)
    target, reference = [], []
    for k in range(config.train.num_epochs):
        epoch_dir = experiment.epoch(k)
        for t in range(len(epoch_dir.read_injected_map())):
            base = epoch_dir.base_image_path(t)
            target.append(pixel_distance(epoch_dir.injected.image_path(t), base))
            reference.append(pixel_distance(epoch_dir.reference_image_path(t), base))
    return float(np.mean(target)), float(np.mean(reference))


def pair_scores(config):
    """Mean reward of the references, bases and targets of the run's pairs (the first epoch: the base model)."""
    epoch_dir = ExperimentDir(config.save_path, config.exp_name).epoch(0)
    scores, targets = epoch_dir.sampled.read_scores(), epoch_dir.injected.read_scores()
    pairs = epoch_dir.read_injected_map()
    return dict(
        reference=float(np.mean([scores[r] for _, r in pairs])),
        base=float(np.mean([scores[b] for b, _ in pairs])),
        target=float(np.mean(targets)),
    )


def evaluate(args, runs):
    """{model: [held-out score of image j]} for the base model and each run's last checkpoint."""
    config = eval_config(args)
    prompts = read_prompt_file(config.heldout.prompt_file)
    evaluator = HeldoutEvaluator(config, prompts)
    results = HeldoutDir(os.path.join(args.out, "heldout"))
    scores = {BASE: evaluator.evaluate(results.model(BASE), None)}
    for name, run_config in runs.items():
        scores[name] = evaluator.evaluate(results.model(name), last_checkpoint(run_config))
    return scores, evaluator.image_prompts


def summarise(args, runs, scores, samples, minutes):
    from d_fusion.shapes.reward import fully_aligned

    results = HeldoutDir(os.path.join(args.out, "heldout"))
    base = np.array(scores[BASE])

    def aligned(name):
        images = results.model(name).images
        return [fully_aligned(Image.open(images.image_path(j)), p) for j, p in enumerate(samples)]

    rows = []
    for method in [BASE, *METHODS]:
        names = [BASE] if method == BASE else [n for n in runs if n.startswith(method + "_")]
        ours = np.concatenate([scores[n] for n in names])
        paired = np.concatenate([base] * len(names))
        row = dict(method=method, runs=len(names), images=len(ours))
        row["reward"], row["reward_95"] = interval95(ours)
        row["per_seed"] = [float(np.mean(scores[n])) for n in names]
        row["aligned"] = float(np.mean([a for n in names for a in aligned(n)]))
        if method != BASE:
            row["win_rate"] = float(np.mean(ours > paired))
            row["vs_base"], row["vs_base_95"] = interval95(ours - paired)
        rows.append(row)
    dpo_runs = {m: [c for n, c in runs.items() if n.startswith(m + "_")] for m in ("dfusion", "ordinary")}
    distances = [consistency(c) for c in dpo_runs["dfusion"]]
    pairs = [pair_scores(c) for c in dpo_runs["dfusion"]]
    study = dict(
        command="python " + " ".join(sys.argv),
        minutes=minutes,
        machine=f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        seeds=args.seeds,
        epochs=args.epochs,
        heldout_images_per_model=len(base),
        rows=rows,
        target_to_base=float(np.mean([d[0] for d in distances])),
        reference_to_base=float(np.mean([d[1] for d in distances])),
        first_epoch_pairs={k: float(np.mean([p[k] for p in pairs])) for k in ("reference", "base", "target")},
    )
    write_json(os.path.join(args.out, "study.json"), study)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(markdown(study))
    print(markdown(study))
    return study


def markdown(study):
    lines = [
        f"`{study['command']}`: {study['minutes']:.0f} min, {study['machine']}; seeds {study['seeds']}, "
        f"{study['epochs']} epochs each; held-out: {study['heldout_images_per_model']} images per model "
        "(84 test prompts), the same noise for every model.",
        "",
        "| method | mean reward (95% CI) | per seed | fully aligned | win rate vs base | reward - base (95% CI) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in study["rows"]:
        per_seed = ", ".join(f"{v:.3f}" for v in row["per_seed"])
        versus = (f"{row['win_rate']:.1%} | {row['vs_base']:+.3f} +- {row['vs_base_95']:.3f}"
                  if "win_rate" in row else "- | -")
        lines.append(f"| {row['method']} | {row['reward']:.3f} +- {row['reward_95']:.3f} | {per_seed} | "
                     f"{row['aligned']:.1%} | {versus} |")
    pairs = study["first_epoch_pairs"]
    lines += [
        "",
        f"Visual consistency of the D-Fusion pairs (mean absolute pixel difference, 0-255): target to base "
        f"{study['target_to_base']:.1f}, reference to base {study['reference_to_base']:.1f}. Their rewards in "
        f"the first epoch (the base model's samples): reference {pairs['reference']:.3f}, base "
        f"{pairs['base']:.3f}, target {pairs['target']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--timestep-fraction", type=float, default=0.25, help="train.timestep_fraction")
    parser.add_argument("--inner-epochs", type=int, default=1, help="train.num_inner_epochs")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="held-out images per test prompt")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="data/study_shapes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    # each object pair's 14 prompts: binding 0, 7; relations 1-4, 8-11; size 5-6, 12-13 (world.scenes_of_pair)
    train_prompts = [p for i, p in enumerate(read_prompt_file("config/prompt/shapes_train.json")) if i % 14 in (3, 12)]
    write_json(os.path.join(args.out, "train_prompts.json"), train_prompts)
    started = time.time()
    runs = {}
    for seed in args.seeds:
        for method in args.methods.split(","):
            config = study_config(args, seed, method)
            print(f"--- {config.exp_name}", flush=True)
            run_experiment(config)
            runs[config.exp_name] = config
    setup_logging()
    scores, samples = evaluate(args, runs)
    summarise(args, runs, scores, samples, (time.time() - started) / 60)


if __name__ == "__main__":
    main()
