"""Configuration of a D-Fusion run: the release's `get_config()` fields and defaults, then this
project's additions (docs/METHOD.md §2).

Every field is overridable on the command line as `--config.a.b value`. How the sizes multiply
(one process; with `accelerate launch` of K processes, train.batch_size is per process):

    samples per prompt  n = sample.batch_size * sample.num_batches_per_epoch   (a multiple of 4)
    samples per epoch   N = prompts * n
    references / bases per prompt = n / 4 (each guides two targets) / n / 2
    targets (= DPO pairs) per epoch = N / 2
    sampling UNet calls per epoch = T * ceil(N / s), s = sample.compute_batch_size rounded down to whole batches
    fused batches per epoch = ceil((N / 2) / fusion.batch_size), fusion.batch_size rounded down to even
    pairs per optimizer step = train.batch_size * train.gradient_accumulation_steps
    optimizer steps per epoch = train.num_inner_epochs * ceil((N / 2) / pairs per step)
    timesteps per pair (or sample) = floor(sample.num_steps * train.timestep_fraction), of the steps with std > 0
    training UNet calls per optimizer step = ceil(pairs per step * timesteps per pair / train.compute_batch_size),
        each of 4 * train.compute_batch_size rows for DPO with CFG (2 trajectories x 2), 2 * for DDPO

Variants (`--config config/config.py:<name>`):
- `release_full`: the release README's "full version" run on SD 2.1 base (40 prompts x 16 samples);
- `shapes`: the offline demo that shows the method working: the trained toy model shipped at
  assets/shapes/ and the exact shapes reward, on the CPU in a few minutes;
- `tiny`: the fast test setting: a tiny random-weight Stable Diffusion and a tiny CLIP scorer,
  built on first use into `tiny_cache`; `tiny_sd15`, `tiny_sd21v` (768 px, v-prediction) and
  `tiny_sdxl`: the same on the tiny model of another family;
- `tiny_sd3`: the same on a tiny random-weight SD 3.5 (joint-attention transformer, flow matching).
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
    "train.compute_batch_size",  # (item, timestep) rows per training UNet call, the same gradients
    "train.reference_batch_size",  # rows per UNet call of the reference's log-probs, the same values
    "sample.compute_batch_size",  # samples per sampling UNet call, the same samples
    "fusion.batch_size",  # targets per fused pass
    "fusion.mask_images",  # which mask pictures are saved
    "fusion.one_call",  # one UNet call per fused step or two, the same targets
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
    """The release's `get_config()`: its fields and defaults."""
    config = ml_collections.ConfigDict()

    config.seed = 42  # sample j of epoch k draws all its noise from a generator seeded seed + k * N + j
    config.mixed_precision = "fp16"  # frozen weights and autocast: "fp16", "bf16" or "no"; CPU runs use fp32
    config.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere and later GPUs
    config.use_lora = True  # train LoRA adapters each epoch; False: sample, score and fuse only
    config.save_path = "./data"  # experiments live in save_path/exp_name/
    config.exp_name = ""  # the experiment's folder name; empty: a timestamp (run_sample.py)
    config.dev_id = 0  # CUDA device index of a one-process run (the CPU without CUDA)
    # prompts: one prompt, or a JSON list of prompts in `prompt_file` (METHOD.md §1)
    config.prompt = "a cat playing chess"  # the prompt when prompt_file is empty
    config.prompt_file = ""  # a JSON list of prompts, sampled in file order; replaces `prompt`
    # objects of each prompt and their mask thresholds (METHOD.md §6.2)
    config.mask_thr = 0.05  # object mask = cross-attention map >= this; a number, or one per object
    config.mask_thr_file = ""  # JSON {prompt: threshold or [one per object]}; replaces mask_thr
    config.item_idx = [1, 3]  # the objects: 0-based word positions in the prompt (token = word + 1)
    config.item_idx_file = ""  # JSON {prompt: [word position, ...]}; replaces item_idx
    # which attention components, steps and blocks fuse (METHOD.md §6.4), one entry per component:
    # self-attention Q, K, V, then cross-attention Q, K, V. Self Q, with its own inject_t/inject_l,
    # is the fusion switch (the target keeps its own query); where it is on, the self K and V flags
    # (with theirs) say which of K and V come from the reference; the cross flags do nothing
    config.inject_component = "T,T,T,T,T,F"  # six T/F flags
    config.inject_t = "0-18,0-18,0-18,0-18,0-18,"  # steps lo <= num_steps-1-i < hi (i = 0 noisiest): 2..19 of 20
    # blocks lo..hi, inclusive, numbered over the blocks with attentions, or named by part: "mid-up" is the mid
    # block and every up block with attentions in any family, the release's "3-6" on SD 2.1 (2-4 on SDXL)
    config.inject_l = "mid-up,mid-up,mid-up,mid-up,mid-up,"

    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-2-1-base"  # a diffusers folder or hub id
    pretrained.revision = "main"  # hub revision (ignored for a folder)

    config.sample = sample = ml_collections.ConfigDict()  # sampling (METHOD.md §1, §3)
    sample.num_steps = 20  # DDIM steps per image, T
    sample.eta = 1.0  # DDIM noise scale: std = eta * sigma_t; must be > 0 to train (UNets; SD 3: sample.noise_level)
    sample.guidance_scale = 5.0  # classifier-free guidance weight (sampling, fusion and training)
    sample.batch_size = 4  # images per sampling batch, all of one prompt
    sample.num_batches_per_epoch = 1  # batches per prompt per epoch: n = batch_size * this, a multiple of 4
    sample.cfg = True  # classifier-free guidance while sampling and fusing

    config.train = train = ml_collections.ConfigDict()  # training (METHOD.md §7)
    train.batch_size = 1  # pairs (DPO) or samples (DDPO) per process per gradient accumulation step
    train.learning_rate = 1e-4  # AdamW learning rate (constant)
    train.adam_beta1 = 0.9  # AdamW beta1
    train.adam_beta2 = 0.999  # AdamW beta2
    train.adam_weight_decay = 1e-4  # AdamW weight decay
    train.adam_epsilon = 1e-8  # AdamW epsilon
    train.gradient_accumulation_steps = 1  # one optimizer step per batch_size * this pairs
    train.max_grad_norm = 1.0  # gradient norm clip before each optimizer step
    train.num_inner_epochs = 2  # passes over the epoch's pairs (or samples), reshuffled each pass
    train.cfg = True  # classifier-free guidance in training's noise predictions (sample.guidance_scale)
    train.timestep_fraction = 1.0  # each pair trains on floor(num_steps * this) random steps, in (0, 1]
    # the names are the release's: `alpha` is the coefficient DPO and Diffusion-DPO call beta
    train.alpha = 1.0  # DPO: loss = -log sigmoid(alpha * (log r_w - log r_l)) (METHOD.md §7.3)
    train.beta = 0.0  # DPO: weight of mean((eps_theta - eps_ref)^2) on the preferred side (a regulariser)
    train.gamma = 2.0  # read nowhere, as in the release: kept only so the release's command lines run
    train.eps = 0.1  # probability ratios clipped to [1 - eps, 1 + eps] (DPO as D3PO, DDPO as PPO)
    train.num_epochs = 20  # epochs of sample -> score -> fuse -> train; the run ends after epoch num_epochs - 1
    train.adv_clip_max = 5.0  # DDPO: advantages clipped to +-this
    train.save_interval = 2  # checkpoint every this many epochs, and after the last (METHOD.md §7.5)
    train.num_checkpoint_limit = 100  # at most this many checkpoints kept (the oldest go)
    train.begin_epoch = 0  # first epoch of a run that resumes from no checkpoint
    train.use_8bit_adam = False  # bitsandbytes' 8-bit AdamW (pip install bitsandbytes)
    return config


def project_config(config):
    """Fields this project adds to the release's (defaults keep the release's behaviour)."""
    # build the tiny random-weight models into `tiny_cache` when `pretrained.model` (or a reward's model)
    # is <tiny_cache>/sd or /sd3 (<tiny_cache>/clip, /pickscore, /hpsv2/..., /aesthetic/...) and missing; a path
    # elsewhere is never built
    config.pretrained.tiny = False  # True: build the missing tiny test models (see above)
    config.tiny_cache = "./.cache/tiny"  # where the tiny models are built
    config.threads = 0  # torch CPU threads; 0 leaves torch's default
    # SD 3 / 3.5 only (METHOD.md §10): the stochastic flow step's noise level a, std = a * sqrt(sigma / (1 -
    # sigma)); 0 is the scheduler's Euler step (no log-probability: must be > 0 to train); 0.7 is
    # Flow-GRPO's. SD 3 ignores sample.eta, the UNets ignore this
    config.sample.noise_level = 0.7

    # samples per sampling UNet call (2 rows each with CFG): whole batches of sample.batch_size (rounded
    # down, at least one), filled across batches and prompts. Each sample draws its noise from its own
    # generator, so the samples are the same whatever it is (pure batching); larger fills a GPU better
    config.sample.compute_batch_size = 8

    # --- training (METHOD.md §7, §8) ---
    # "dpo": trajectory DPO on (target, base) pairs; "ddpo": PPO-clip on scores; "dpok": DDPO's PPO-clip
    # plus train.kl_weight x the closed-form KL of each step to the pretrained model (METHOD.md §8)
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
    config.train.lora_rank = 4  # LoRA rank on the UNet's to_q, to_k, to_v, to_out.0 (SD 3: every attention projection)
    # (pair or sample, timestep) rows per training UNet forward and backward, each row at its own
    # timestep (DPO: 4 UNet rows each with CFG); an optimizer step's gradient is the same whatever it
    # is (pure batching). Larger fills a GPU better and needs more memory (with checkpointing less)
    config.train.compute_batch_size = 4
    # (pair, timestep) rows per UNet call of DPO's reference log-probs, computed once per epoch without
    # gradients (so a larger batch fits than compute_batch_size); pure batching
    config.train.reference_batch_size = 16
    config.train.gradient_checkpointing = False  # recompute UNet activations in backward: less memory, slower
    config.train.tensorboard = False  # also log the metrics to data/<exp_name>/tensorboard (needs tensorboard)
    # a checkpoint folder (checkpoints/checkpoint_<k>) or a folder of them (the newest is used): the run
    # restores LoRA, optimizer and RNG state from it and continues at epoch k + 1. Empty: the
    # experiment's own newest checkpoint when it has one (a rerun continues), else begin_epoch
    config.resume_from = ""

    # --- scoring (METHOD.md §5): run_eval.py, or the sampler itself with eval.inline ---
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

    # --- D-Fusion (METHOD.md §4 and §6) ---
    # the objects as words, the same for every prompt, e.g. "cat,sandwich" (each word: all its tokens);
    # when set it replaces item_idx (and may not be combined with item_idx_file). Not named `items`:
    # that is a ConfigDict method.
    config.item_words = ""
    config.fusion = fusion = ml_collections.ConfigDict()
    fusion.mask_resolution = 0  # UNets: query grid side of the mask layers; 0: latent side // 4 (16 for SD 2.1 base)
    fusion.use_mask = True  # False: fuse without a mask (K' = K_ref, V' = V_ref over the whole image)
    fusion.mask_images = "all"  # mask pictures under mask/: "all" steps, the "last" step, or "none"
    # targets made per fused sampling pass (even: each reference guides two targets in a row); pairs
    # of several prompts share a pass, each pass costs 1.5 UNet calls per target per step (METHOD.md
    # §6.5). Larger fills a GPU better (SD 2.1 fp16 on an H200: 0.59x the release's time at 8
    # targets, 0.52x at 16) and holds more keys and values in memory
    fusion.batch_size = 8
    # one UNet call per fused step: the targets' step i with the references' step i + 1 (the same targets
    # as two calls, the references' then the targets': pure batching; holds two steps' keys and values)
    fusion.one_call = True
    fusion.base_masks = False  # also regenerate each base (one more UNet pass per step) to save its masks
    # SD 3 / 3.5 only (METHOD.md §10): the transformer blocks (0..N-1, forward order, "lo-hi" inclusive)
    # whose image-token K and V fuse, where inject_t's self-attention Q entry says (inject_l, a UNet's
    # block numbers, does not apply); "": the second half, N//2..N-1 (SD 3.5 Medium: 12-23)
    fusion.blocks = ""
    # SD 3 / 3.5 only: the blocks whose image-to-text attention gives the object masks (fusion.mask_resolution
    # does not apply: the masks are on the image-token grid); "": the middle third, N//3..2N//3-1 (Medium: 8-15)
    fusion.mask_blocks = ""

    # --- held-out evaluation and report: run_heldout.py, run_report.py ---
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
    variants = {"tiny": tiny, "shapes": shapes, "release_full": release_full}
    variants |= {f"tiny_{name}": tiny_of(name) for name in TINY_FAMILIES}
    variants["tiny_sd3"] = tiny_sd3
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(variants)}")
    return variants[variant](config)


def release_full(config):
    """The release README's "full version" run (its Terminal 2 command line), on SD 2.1 base:

        python run_eval.py   --config config/config.py:release_full --config.exp_name full
        python run_sample.py --config config/config.py:release_full --config.exp_name full \\
            --config.pretrained.model path/to/sd2.1-base

    Batch arithmetic (docs/METHOD.md §2), per epoch:
        40 prompts (template1_train.json) x 8 batches x 2 images = 640 samples, 16 per prompt;
        per prompt the best 16 / 4 = 4 are references (each used twice), the lower 16 / 2 = 8 bases:
        8 (reference, base) pairs per prompt, 40 x 8 = 320 targets, made in 320 / 8 = 40 fused
        batches of fusion.batch_size 8 (one prompt's 4 references and 8 targets each);
        DPO on the 320 (target, base) pairs: train.num_inner_epochs 2 x 320 / (train.batch_size 1 x
        gradient_accumulation_steps 1) = 640 optimizer steps, each over 20 timesteps of one pair.
    One epoch (train.num_epochs 1), as the release's command; the release's default is 20
    (--config.train.num_epochs 20). Everything else is the release's default (release_config), and
    the project's fields keep their defaults: scores come from run_eval.py in a second terminal, as in
    the release (eval.inline False).
    """
    config.seed = 42
    config.prompt_file = "config/prompt/template1_train.json"  # 40 prompts: 20 animals, 3 activities
    config.mask_thr_file = "config/prompt/template1_mask.json"  # a threshold per object of each prompt
    config.item_idx_file = "config/prompt/template1_item.json"  # the two objects' word positions
    config.sample.num_batches_per_epoch = 8
    config.sample.batch_size = 2  # 8 x 2 = 16 samples per prompt
    config.train.num_epochs = 1
    return config


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


# config.py:tiny_<name>: the tiny setting on another family's tiny model (d_fusion/tiny.py, docs/METHOD.md §9):
# sd15 (SD 1.5's UNet), sd21v (SD 2.1 at 768 px, v-prediction), sdxl (SDXL: two text encoders, text_time)
TINY_FAMILIES = ("sd15", "sd21v", "sdxl")


def tiny_of(name):
    """The variant `tiny` on the tiny model <tiny_cache>/<name>."""

    def variant(config):
        config = tiny(config)
        config.pretrained.model = config.get_ref("tiny_cache") + "/" + name
        return config

    return variant


def tiny_sd3(config):
    """`tiny` on a tiny random-weight SD 3.5 (d_fusion/tiny.py: joint-attention blocks, the first two
    dual-attention, two CLIPs, no T5), built on first use into `tiny_cache`/sd3."""
    config = tiny_of("sd3")(config)
    # 77 CLIP + 256 (zero) T5 tokens: a uniform map is ~1/333 a token; 0.003 keeps part of each object's map
    config.mask_thr = 0.003
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
