"""The shapes world: a toy text-to-image task where D-Fusion can be seen and measured on a CPU.

- `world`: scenes of one or two flat shapes, their captions (three prompt families), drawing, and the
  split of object pairs into the model's training, D-Fusion's training and the held-out test prompts;
- `reward`: an exact alignment reward that finds the objects in an image and scores the prompt's facts;
- `train`: trains the small Stable Diffusion (VAE, CLIP text encoder, UNet) shipped at `assets/shapes/`.
"""
