"""Configuration of a D-Fusion run (SPEC section 2: the release's `get_config()`).

Every field is overridable on the command line as `--config.a.b value`. Variants:
- `--config config/config.py:shapes`: the offline demo that shows the method working: the trained
  toy model shipped at assets/shapes/ and the exact shapes reward, on the CPU in a few minutes;
- `--config config/config.py:tiny`: the fast test setting: a tiny random-weight Stable Diffusion
  and a tiny CLIP scorer, built on first use into `tiny_cache`.
"""

import ml_collections

# The settings that may change when an experiment is rerun (same exp_name). The first start records
# every setting in data/<exp_name>/config.json; a rerun that changes any other setting (they shape the
# results: seed, sampling, fusion, training, the model and the reward) stops at start-up, listing the
# changed fields. These only say how long the run goes, how its work is batched, where it runs, and
# what is watched, logged or reported. "block.*" stands for every field of the block.
RERUN_MAY_CHANGE = (
    "train.num_epochs",  # extend a run
    "resume_from",  # continue from another of the experiment's checkpoints
    "train.save_interval",
    "train.num_checkpoint_limit",
    "train.tensorboard",
    "train.gradient_checkpointing",  # memory against speed, the same gradients
    "fusion.batch_size",  # targets per fused pass
    "fusion.mask_images",  # which mask pictures are saved
    "eval.inline",  # score in the sampler, or wait for run_eval.py
    "eval.batch_size",
    "eval.poll_interval",
    "eval.no_scorer_timeout",
    "eval.exit_when_finished",
    "eval.debug_batch_delay",
    "heldout.*",  # run_heldout.py's own settings
    "report.*",
    "threads",
    "dev_id",
    "save_path",  # the experiment's folder was moved
    "exp_name",
    "tiny_cache",
    "pretrained.tiny",
)


def release_config():
    config = ml_collections.ConfigDict()

    config.seed = 42
    config.mixed_precision = "fp16"  # "fp16", "bf16" or "no"; CPU runs always use fp32
    config.allow_tf32 = True
    config.use_lora = True
    config.save_path = "./data"
    config.exp_name = ""
    config.dev_id = 0
    # prompts: one prompt, or a JSON list of prompts in `prompt_file`
    config.prompt = "a cat playing chess"
    config.prompt_file = ""
    # objects of each prompt and their mask thresholds (SPEC section 6)
    config.mask_thr = 0.05
    config.mask_thr_file = ""
    config.item_idx = [1, 3]
    config.item_idx_file = ""
    # which attention components, steps and blocks fuse: self Q, K, V, cross Q, K, V, as in the
    # release (SPEC section 6): the self Q flag, with its own inject_t/inject_l, is the fusion switch
    # (the target keeps its own query); where it is on, the self K and V flags (with theirs) say
    # which of K and V come from the reference; the three cross flags are parsed and checked only
    config.inject_component = "T,T,T,T,T,F"
    config.inject_t = "0-18,0-18,0-18,0-18,0-18,"
    config.inject_l = "3-6,3-6,3-6,3-6,3-6,"

    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-2-1-base"
    pretrained.revision = "main"

    config.sample = sample = ml_collections.ConfigDict()
    sample.num_steps = 20
    sample.eta = 1.0
    sample.guidance_scale = 5.0
    sample.batch_size = 4
    sample.num_batches_per_epoch = 1
    sample.cfg = True

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 1
    train.learning_rate = 1e-4
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 1e-4
    train.adam_epsilon = 1e-8
    train.gradient_accumulation_steps = 1
    train.max_grad_norm = 1.0
    train.num_inner_epochs = 2
    train.cfg = True
    train.timestep_fraction = 1.0
    train.alpha = 1.0
    train.beta = 0.0
    train.gamma = 2.0  # read nowhere, as in the release: kept only so the release's command lines run
    train.eps = 0.1
    train.num_epochs = 20
    train.adv_clip_max = 5.0
    train.save_interval = 2
    train.num_checkpoint_limit = 100
    train.begin_epoch = 0
    train.use_8bit_adam = False
    return config


def project_config(config):
    """Fields this project adds to the release's (defaults keep the release's behaviour)."""
    # build the tiny random-weight models into `tiny_cache` when `pretrained.model` (or a reward's model)
    # is <tiny_cache>/sd (<tiny_cache>/clip, /pickscore, /hpsv2/..., /aesthetic/...) and missing; a path
    # elsewhere is never built
    config.pretrained.tiny = False
    config.tiny_cache = "./.cache/tiny"
    config.threads = 0  # torch CPU threads; 0 leaves torch's default

    # --- training (issue 4, SPEC section 7) ---
    # "dpo": trajectory DPO on (target, base) pairs; "ddpo": PPO-clip on scores; "dpok": DDPO's PPO-clip
    # plus train.kl_weight x the closed-form KL of each step to the pretrained model (SPEC section 8)
    config.train.algorithm = "dpo"
    config.train.kl_weight = 0.01  # dpok: the weight of the KL penalty
    # ddpo/dpok advantages: 0 standardises each prompt's scores within the epoch; N > 0 uses ddpo-pytorch's
    # per-prompt stat tracking: the mean and std of the prompt's last N scores across epochs (this epoch's
    # included), or of the whole epoch's scores while the prompt has fewer than stat_min_count of them
    config.train.stat_buffer = 0
    config.train.stat_min_count = 16
    # what DPO prefers over each base: "target" (D-Fusion's visually consistent pair) or "reference"
    # (the paper's baseline: the ordinary well-aligned sample, visually inconsistent with the base)
    config.train.preferred = "target"
    config.train.lora_rank = 4  # LoRA on the UNet's to_q, to_k, to_v, to_out.0
    config.train.gradient_checkpointing = False  # recompute UNet activations in backward: less memory, slower
    config.train.tensorboard = False  # also log the metrics to data/<exp_name>/tensorboard (needs tensorboard)
    # a checkpoint folder (checkpoints/checkpoint_<k>) or a folder of them (the newest is used): the run
    # restores LoRA, optimizer and RNG state from it and continues at epoch k + 1. Empty: the
    # experiment's own newest checkpoint when it has one (a rerun continues), else begin_epoch
    config.resume_from = ""

    # --- CLIP scorer (issue 3, SPEC section 5): run_eval.py, or the sampler itself with eval.inline ---
    config.eval = ev = ml_collections.ConfigDict()
    # what scores an image against its prompt (d_fusion/rewards.py: REWARDS): "clip" (the release's
    # CLIP score, with the model below), "pickscore", "hpsv2", "aesthetic" (their models below) or
    # "shapes" (the exact reward of the shapes world); or a weighted sum, "clip:1.0,pickscore:0.5".
    # Score files record it; a rerun with another reward stops at start-up (not in RERUN_MAY_CHANGE)
    ev.reward = "clip"
    # open_clip architecture name with a pretrained tag or checkpoint file, or an open_clip folder
    # (open_clip_config.json + weights; "local-dir:" optional; "hf-hub:org/repo" also works).
    # With pretrained.tiny, a missing <tiny_cache>/clip is built like the tiny diffusion model (nothing else).
    ev.model = "ViT-H-14"
    ev.pretrained = "laion2B-s32B-b79K"  # ignored when `model` is a folder or hub id
    # PickScore: a transformers CLIPModel and its CLIPProcessor (folders or hub ids), as PickScore_v1 ships
    ev.pickscore_model = "yuvalkirstain/PickScore_v1"
    ev.pickscore_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # HPS v2: an open_clip architecture name (or an open_clip model config .json file) and an HPS
    # checkpoint: a file, or org/repo/file on the hub (xswu/HPSv2 also holds HPS_v2_compressed.pt, v2.0)
    ev.hpsv2_architecture = "ViT-H-14"
    ev.hpsv2_checkpoint = "xswu/HPSv2/HPS_v2.1_compressed.pt"
    # LAION aesthetic predictor: its CLIP (open_clip name and pretrained tag, or a folder) and its head's
    # weights: a file or org/repo/file. The improved predictor's MLP (sac+logos+ava1-l14-linearMSE.pth) is
    # published at github.com/christophschuhmann/improved-aesthetic-predictor; LAION's linear v1
    # (sa_0_4_vit_l_14_linear.pth) at github.com/LAION-AI/aesthetic-predictor: download it and pass its path
    ev.aesthetic_clip = "ViT-L-14"
    ev.aesthetic_clip_pretrained = "openai"
    ev.aesthetic_model = "sac+logos+ava1-l14-linearMSE.pth"
    ev.batch_size = 8  # images per CLIP forward pass; scores are saved after each batch
    ev.inline = False  # True: the sampler scores its own images; False: it waits for run_eval.py
    ev.poll_interval = 2.0  # seconds between looks at data/<exp_name>/ (scorer and waiting sampler)
    ev.no_scorer_timeout = 60.0  # the waiting sampler says how to start a scorer after this many idle seconds
    ev.exit_when_finished = False  # run_eval.py also exits once the sampler has written finished.json
    ev.debug_batch_delay = 0.0  # debugging/crash tests: seconds the scorer sleeps after each saved batch

    # --- D-Fusion (issue 7, SPEC sections 4 and 6) ---
    # the objects as words, the same for every prompt, e.g. "cat,sandwich" (each word: all its tokens);
    # when set it replaces item_idx (and may not be combined with item_idx_file). Not named `items`:
    # that is a ConfigDict method.
    config.item_words = ""
    config.fusion = fusion = ml_collections.ConfigDict()
    fusion.mask_resolution = 0  # query grid side of the mask layers; 0: latent side // 4 (16 for SD 2.1 base)
    fusion.use_mask = True  # False: fuse without a mask (K' = K_ref, V' = V_ref over the whole image)
    fusion.mask_images = "all"  # mask pictures under mask/: "all" steps, the "last" step, or "none"
    # targets made per fused sampling pass (even: each reference guides two targets in a row); pairs
    # of several prompts share a pass. Larger fills a GPU better (SD 2.1 fp16 on an H200: 0.59x the
    # release's time at 8 targets, 0.52x at 16) and holds more keys and values in memory
    fusion.batch_size = 8
    fusion.base_masks = False  # also regenerate each base (one more UNet pass per step) to save its masks

    # --- held-out evaluation and report (issue 6): run_heldout.py, run_report.py ---
    config.heldout = heldout = ml_collections.ConfigDict()
    heldout.prompt_file = "config/prompt/template1_test.json"  # held-out prompts (a JSON list)
    heldout.images_per_prompt = 4  # image j (prompt by prompt) has seed `seed + j`, for every model alike
    heldout.batch_size = 4  # images per sampling batch
    # "" evaluates the base model only; a checkpoint folder (checkpoints/checkpoint_<k>) adds it; a folder
    # of checkpoints adds each of them. Results already on disk with the same settings are reused.
    heldout.checkpoint = ""
    # the rewards every held-out image is scored with, comma-separated names ("clip,pickscore,hpsv2");
    # "" scores with the training reward (eval.reward, a weighted sum too). Each needs its model (eval.*)
    heldout.rewards = ""
    # also report each model's diversity: per prompt, the mean pairwise 1 - cosine of its images' CLIP image
    # embeddings (the clip reward's eval.model), averaged over prompts; needs images_per_prompt >= 2
    heldout.diversity = True
    config.report = report = ml_collections.ConfigDict()
    report.each_epoch = False  # the sampler also updates data/<exp_name>/report/ after every epoch
    report.watch = False  # run_report.py keeps updating the report until the sampler has finished
    report.poll_interval = 30.0  # seconds between updates when watching
    report.thumbnail = 256  # side in pixels of each picture in the epoch grids
    return config


def get_config(variant=None):
    config = project_config(release_config())
    if variant in (None, ""):
        return config
    variants = {"tiny": tiny, "shapes": shapes}
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(variants)}")
    return variants[variant](config)


def tiny(config):
    """The offline demo: tiny random-weight models, small batches, a few steps, fp32 on CPU."""
    config.pretrained.tiny = True
    # references: `--config.tiny_cache DIR` moves both models
    config.pretrained.model = config.get_ref("tiny_cache") + "/sd"
    config.eval.model = config.get_ref("tiny_cache") + "/clip"
    config.eval.pickscore_model = config.get_ref("tiny_cache") + "/pickscore"
    config.eval.pickscore_processor = config.get_ref("tiny_cache") + "/pickscore"
    config.eval.hpsv2_architecture = config.get_ref("tiny_cache") + "/hpsv2/tiny-hps.json"
    config.eval.hpsv2_checkpoint = config.get_ref("tiny_cache") + "/hpsv2/HPS_v2.1_compressed.pt"
    config.eval.aesthetic_clip = config.get_ref("tiny_cache") + "/clip"
    config.eval.aesthetic_model = config.get_ref("tiny_cache") + "/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    config.eval.inline = True
    config.mixed_precision = "no"
    config.threads = 1
    config.prompt_file = "config/prompt/template1_3prompt.json"
    config.item_idx_file = "config/prompt/template1_item.json"
    # the random tiny model attends almost uniformly (~1/77 per token), so the release's thresholds
    # (0.005-0.03) would give empty or full masks; 0.014 keeps about half of each object's map
    config.mask_thr_file = ""
    config.mask_thr = 0.014
    config.fusion.batch_size = 4
    config.sample.num_steps = 10
    config.sample.batch_size = 4
    config.sample.num_batches_per_epoch = 1
    config.inject_t = "0-8,0-8,0-8,0-8,0-8,"
    config.train.num_epochs = 2
    config.train.num_inner_epochs = 1
    config.train.save_interval = 1
    return config


def shapes(config):
    """The shapes demo (d_fusion/shapes, README "The shapes world"): the release's sampling settings
    (DDIM 20 steps, eta 1, CFG 5) and fusion ranges on a toy SD 2.1, scored by the exact shapes
    reward, fp32 on the CPU.

    Per epoch: 4 prompts x 8 samples = 32 images; per prompt the best 2 are references (each used
    twice) and the lower 4 bases, so 4 (reference, base) pairs and 16 targets; DPO on the 16
    (target, base) pairs, 20 steps each, once. About a minute per epoch on 2 cores.
    """
    config.pretrained.model = "assets/shapes"
    config.eval.reward = "shapes"
    config.eval.inline = True  # the reward is cheap: the sampler scores its own images
    config.mixed_precision = "no"
    config.threads = 2
    config.prompt_file = "config/prompt/shapes_demo.json"  # one prompt of each family, and one more
    config.item_idx_file = "config/prompt/shapes_item.json"  # the two shape nouns of each prompt
    config.mask_thr_file = "config/prompt/shapes_mask.json"
    config.fusion.mask_resolution = 8  # the toy UNet's 8x8 layers: SD 2.1's 16x16 at a 16x16 latent
    config.fusion.batch_size = 16
    config.sample.batch_size = 8
    config.sample.num_batches_per_epoch = 1
    config.train.num_epochs = 4
    config.train.num_inner_epochs = 1  # one pass over the pairs per epoch: the demo stays a few minutes
    config.train.save_interval = 1
    config.heldout.prompt_file = "config/prompt/shapes_test.json"
    config.heldout.images_per_prompt = 4
    config.heldout.batch_size = 16
    config.heldout.diversity = False  # no CLIP model offline (eval.model is ViT-H-14, a download)
    config.report.each_epoch = True  # data/<exp_name>/report/index.html after every epoch
    config.report.thumbnail = 96
    return config
