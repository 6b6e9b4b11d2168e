"""How good a shapes model is: how often its samples are aligned, and where its object tokens attend.

`python -m d_fusion.shapes.quality [MODEL] [--images-per-prompt 4]` samples the train and test
prompts with the shapes config's settings (the release's DDIM 20 steps, eta 1, CFG 5), image j
seeded `seed + j`, and prints, per prompt set:
- the mean shapes reward and the fraction of fully aligned samples (both references and bases
  exist when it lies between 20% and 80%);
- the mean IoU between each object's fusion mask (its tokens' cross-attention at the mask layers,
  averaged over layers and heads, binarised at a threshold: exactly what fusion uses, docs/METHOD.md
  §6.2) and the object's region in the final image, over the objects the reward finds, at
  every step and at the last, for several thresholds.
"""

import argparse

import numpy as np
import torch
from PIL import Image

from d_fusion.fusion import FusionBatch, fused_sampling
from d_fusion.masks import item_selection, load_objects
from d_fusion.sampling import decode_images, encode_prompts, negative_conditioning, sample_generators
from d_fusion.stages import fusion_settings
from d_fusion.shapes import world
from d_fusion.shapes.reward import find_regions, fully_aligned, match, shapes_score, thing_confidence

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)


@torch.no_grad()
def sample_with_masks(models, config, prompts, seed, thresholds=THRESHOLDS):
    """Plain samples of `prompts` (one each, generator `seed + j`) and each object's mask at each step
    for each threshold: (images (B, H, W, 3) uint8, masks (B, T, I, K, g, g) bool).

    The samples are the references of a fused sampling (regenerated unchanged, docs/METHOD.md §6), whose
    objects are listed K times, once per threshold; one throwaway target keeps the pass cheap.
    """
    objects = load_objects(config, prompts)
    conditioning = encode_prompts(models, prompts)
    weights, _ = item_selection(models.tokenizer, prompts, objects, conditioning.num_tokens)  # (B, I, 77)
    count = weights.shape[1]
    weights = weights.repeat_interleave(len(thresholds), dim=1)  # (B, I * K, 77)
    levels = torch.tensor(thresholds).repeat(len(prompts), count)  # (B, I * K)
    generators = sample_generators(seed, 0, len(prompts), range(len(prompts)))
    batch = FusionBatch(conditioning, generators, sample_generators(seed, 0, len(prompts), [0]), torch.tensor([0]), weights, levels)
    fused = fused_sampling(models.unet, models.scheduler, batch, negative_conditioning(models), fusion_settings(config, models))
    images = decode_images(models, fused.references.latents[:, -1])
    masks = fused.reference_masks.unflatten(2, (count, len(thresholds)))  # (B, T, I, K, g, g)
    return images, masks


def mask_iou(mask, pixels):
    """IoU of a (g, g) mask, nearest-upsampled to the image, with a region's (H, W) pixels."""
    scale = pixels.shape[0] // mask.shape[0]
    upsampled = np.kron(mask.astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool)
    return (upsampled & pixels).sum() / max(1, (upsampled | pixels).sum())


def object_ious(images, prompts, masks):
    """IoU of each found object's mask with its region: (N found objects, T steps, K thresholds)."""
    ious = []
    for image, prompt, image_masks in zip(images, prompts, masks.cpu().numpy()):
        scene = world.parse(prompt)
        regions = find_regions(image)
        for k, (thing, index) in enumerate(zip(scene.things, match(regions, scene))):
            if index is None or thing_confidence(thing, regions[index]) < 0.5:
                continue  # the object is not in the image: nothing to cover
            pixels = regions[index].pixels
            ious.append([[mask_iou(m, pixels) for m in step[k]] for step in image_masks])
    return np.array(ious)


def measure(models, config, prompts, seed, images_per_prompt, batch_size=16):
    """{mean reward, fraction aligned, IoU per threshold (all steps, last step)} of the model on `prompts`."""
    samples = [p for p in prompts for _ in range(images_per_prompt)]
    scores, aligned, ious = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images, masks = sample_with_masks(models, config, batch, seed + start)
        pil = [Image.fromarray(image) for image in images]
        scores += [shapes_score(image, prompt) for image, prompt in zip(pil, batch)]
        aligned += [fully_aligned(image, prompt) for image, prompt in zip(pil, batch)]
        ious.append(object_ious(images, batch, masks))
    ious = np.concatenate([i for i in ious if len(i)])  # (N, T, K)
    return dict(
        images=len(samples),
        reward=float(np.mean(scores)),
        aligned=float(np.mean(aligned)),
        objects=len(ious),
        iou_all_steps={t: float(v) for t, v in zip(THRESHOLDS, ious.mean(axis=(0, 1)))},
        iou_last_step={t: float(v) for t, v in zip(THRESHOLDS, ious[:, -1].mean(axis=0))},
    )


def main():
    from config.config import get_config
    from d_fusion.models import load_models
    from d_fusion.prompts import read_prompt_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="assets/shapes")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_config("shapes")
    models = load_models(args.model, mixed_precision="no")
    for split in ("train", "test"):
        prompts = read_prompt_file(f"config/prompt/shapes_{split}.json")
        result = measure(models, config, prompts, args.seed, args.images_per_prompt)
        print(f"shapes_{split}.json: {result['images']} images, mean reward {result['reward']:.3f}, "
              f"fully aligned {result['aligned']:.1%}, {result['objects']} objects found")
        for name in ("iou_all_steps", "iou_last_step"):
            print(f"  mask IoU ({name[4:].replace('_', ' ')}): "
                  + ", ".join(f"thr {t}: {v:.3f}" for t, v in result[name].items()))


if __name__ == "__main__":
    main()
