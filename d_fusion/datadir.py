"""The experiment's data directory: the one place that knows every path and file format.

    data/<exp_name>/
        run.log                       the sampler's log (with the fatal error of a failed run)
        eval.log                      run_eval.py's log
        config.json                   the settings, package versions and git commit of the first start
        sampler.lock, scorer.lock     held (fcntl.flock) by the running run_sample.py / run_eval.py
        finished.json                 written by the sampler when its last epoch is done
        metrics.jsonl                 one JSON line of training metrics per trained epoch
        tensorboard/                  the same metrics for tensorboard (train.tensorboard)
        checkpoints/checkpoint_<k>/   after training epoch k (written whole, then renamed into place):
            pytorch_lora_weights.safetensors   UNet LoRA, as StableDiffusionPipeline.load_lora_weights reads it
            training_state.safetensors         optimizer tensors and RNG states
            training_state.json                epoch, optimizer groups and scalars, grad-scaler state
        epoch<k>/
            images/00000.png ...      first sampling pass, index = position in the epoch
            prompt.json               prompts of the published images, in index order
            trajectories/00000.safetensors   latents (T+1, C, H, W), log_probs (T,), timesteps (T,)
            injected_images/00000.png ...    targets (D-Fusion), index = target index
            injected_prompt.json      prompts of the published targets, in index order
            injected_trajectories/00000.safetensors   the targets' trajectories, as trajectories/
            ref_images/00000.png ...  the reference of each target (a copy of its images/ PNG), index = target index
            base_images/00000.png ... the base of each target (likewise)
            mask/00000_item0_t05.png  object 0's mask of sample 00000 (a reference, or a base when
                                      fusion.base_masks) at step 5 (0 = noisiest)
            eval/injected_map.json    {target index: [base index, reference index]} (sample indices)
            eval/images_scores.json   scores of images/: {"count", "mean", "scores": [one per image], "reward"}
            eval/injected_images_scores.json   the same for injected_images/
            eval/prompt_history.json  per prompt, the scores of images/ of every epoch up to k
        heldout/<prompt set>/         run_heldout.py on a prompt file (the set is the file's name without .json)
            table.csv, table.json     per prompt and overall, per reward: mean score of each model, delta and
                                      wins vs base; each model's diversity
            <model>/                  "base", or the checkpoint's folder name (checkpoint_<k>)
                settings.json         what made the images (model, checkpoint, prompts, seeds, sampling), each
                                      reward's scores and the diversity
                images/00000.png ...  images_per_prompt images per prompt, prompt by prompt; image j's seed is seed + j
                prompt.json           their prompts, in index order
                eval/<reward>_scores.json   their scores by one reward (label with = for :, + for ,), as an epoch's
                eval/diversity.json   per prompt, the mean pairwise 1 - cosine of its images' CLIP embeddings
        report/                       run_report.py: a static HTML report of the folder
            index.html                links images by relative paths inside data/<exp_name>/
            curves_<name>.png         curves over epochs (clip, training, heldout)
            epoch<k>/grid.png         rows of reference | base | target | mask overlay, with scores
            epoch<k>/overlay_00000.png   target 00000 with its reference's object mask overlaid

Every file another process reads is written to a temporary name and renamed into place, so a
reader sees the whole file or none of it. An image set (`images/`, `injected_images/`) is
published batch by batch: first the batch's PNGs, then its prompt list, rewritten to cover
images 0..n-1. The prompt list is the set's manifest: a reader uses only the images it lists.
Scores are written the same way, in index order, after each scored batch. A writer killed
mid-write leaves a `.tmp-*` scratch entry, cleared at the next start-up (an `.old-*` folder, the
previous version of a folder being replaced, is kept: it may be the only copy left).
"""

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
import torch
from safetensors.torch import load_file, save_file

from d_fusion.errors import UserError
from d_fusion.sampling import Trajectories


SCRATCH_PREFIX = ".tmp-"  # the scratch names of _atomic and atomic_folder


def _umask():
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path, mode):
    """Give a scratch file or folder (tempfile makes them 0600 / 0700) the mode `mode` less the umask, as
    open() and os.mkdir() would: a published file is as readable as any other program's."""
    os.chmod(path, mode & ~_umask())


def _atomic(path, write):
    """Call write(tmp_path), then rename tmp_path to path."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _publish_mode(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path, replace=True):
    """Yield a scratch folder beside `path`; when the block succeeds it replaces `path` whole. With
    replace=False a `path` that another process made meanwhile is kept and the scratch dropped."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    try:
        yield scratch
        _publish_mode(scratch, 0o777)
        old = None
        if os.path.isdir(path):
            if not replace:
                return
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)  # keep the old folder until the new one is in place
            os.replace(path, os.path.join(old, "folder"))
        try:
            os.rename(scratch, path)
        except OSError:
            if replace or not os.path.isdir(path):  # not a folder another process made meanwhile
                raise
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def clear_scratch(folder, skip=()):
    """Remove the scratch files and folders (`.tmp-*`) that a killed writer left under `folder`,
    not descending into folders named in `skip`; returns the removed paths."""
    removed = []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if name not in skip]
        for name in [n for n in folders + files if n.startswith(SCRATCH_PREFIX)]:
            path = os.path.join(parent, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        folders[:] = [name for name in folders if not name.startswith(SCRATCH_PREFIX)]
    return removed


@contextlib.contextmanager
def exclusive_lock(path, refusal):
    """Hold an exclusive lock on the file `path` for the block (fcntl.flock: the OS releases it when the
    process ends, even by kill -9). The file keeps the holder's pid. When another process holds it,
    UserError(refusal(pid)) at once, with pid the holder's ("?" when it cannot be read)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(refusal(_lock_holder(fd))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(fd):
    """The pid written in a lock file by its holder, or "?"."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "?"


def is_locked(path):
    """Whether a process holds the exclusive lock on `path` now."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    _atomic(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def write_figure(path, figure):
    """A matplotlib figure -> PNG."""
    _atomic(path, lambda tmp: figure.savefig(tmp, format="png"))


def read_json(path, what="file"):
    """JSON from `path`; a truncated or corrupt file is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:  # json.JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise UserError(f"{what} {path} is corrupt or half-written ({error}); move it aside and rerun") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None


def write_image(path, image):
    """uint8 (H, W, 3) array -> PNG."""
    _atomic(path, lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG"))


def read_image(path):
    """PNG -> RGB PIL image; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL's errors for missing, truncated or corrupt files
        raise UserError(f"image {path} is unreadable ({error}); move it aside and rerun") from None


def write_tensors(path, tensors):
    _atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp))


def copy_file(source, path):
    _atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def read_tensors(path):
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise UserError(f"tensor file {path} is unreadable ({error}); move it aside and rerun") from None


def unreadable(path):
    """Why the PNG or safetensors file `path` cannot be read (missing, truncated, corrupt), or None."""
    try:
        read_image(path) if path.endswith(".png") else read_tensors(path)
    except UserError as error:
        return str(error)
    return None


def damaged_units(files_of, count, unit):
    """[(start, reason)] of the units of `unit` consecutive indices in 0..count-1 (samples of a batch,
    targets of a fused chunk) that have a file (files_of(index): its paths) that cannot be read."""
    damaged = []
    for start in range(0, count, unit):
        reasons = [unreadable(path) for i in range(start, min(start + unit, count)) for path in files_of(i)]
        reasons = [reason for reason in reasons if reason]
        if reasons:
            damaged.append((start, reasons[0]))
    return damaged


def is_number(value):
    """A finite int or float (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean(values):
    """The mean of a list of numbers; None for an empty list."""
    return sum(values) / len(values) if values else None


def score_text(score, signed=False):
    """A score as the tables and the report print it: 4 decimals, a sign for differences, "-" for none."""
    if score is None:
        return "-"
    return f"{score:+.4f}" if signed else f"{score:.4f}"


def image_name(index):
    return f"{index:05d}.png"


class ImageSet:
    """A set of an epoch's images (`images/` or `injected_images/`): each image's PNG and denoising
    trajectory, the manifest (the prompt list) and the scores. The one owner of the trajectory files:
    nothing outside this module knows their key names or file names."""

    def __init__(self, epoch_root, name, prompts_name, trajectories_name=None, scores_name=None):
        self.name = name
        self.folder = os.path.join(epoch_root, name)
        self.prompts_file = os.path.join(epoch_root, prompts_name)
        self.trajectories = os.path.join(epoch_root, trajectories_name) if trajectories_name else None
        self.scores_file = os.path.join(epoch_root, "eval", f"{scores_name or name}_scores.json")

    def image_path(self, index):
        return os.path.join(self.folder, image_name(index))

    def trajectory_path(self, index):
        return os.path.join(self.trajectories, f"{index:05d}.safetensors")

    def files(self, index):
        """The files of image `index` that later stages read: its PNG and, where kept, its trajectory."""
        return [self.image_path(index)] + ([self.trajectory_path(index)] if self.trajectories else [])

    def save_images(self, indices, images):
        """images: uint8 (B, H, W, 3), row b is image indices[b]."""
        for index, image in zip(indices, images):
            write_image(self.image_path(index), image)

    def save_trajectories(self, indices, trajectories):
        """Row b of `trajectories` (a sampling.Trajectories batch) is image indices[b]'s."""
        for row, index in enumerate(indices):
            one = trajectories[row]
            write_tensors(
                self.trajectory_path(index),
                dict(latents=one.latents, log_probs=one.log_probs, timesteps=one.timesteps),
            )

    def load_trajectories(self, indices):
        """The trajectories of images `indices`, stacked in that order: a Trajectories batch."""
        stored = [read_tensors(self.trajectory_path(i)) for i in indices]  # latents (T+1, C, H, W), log_probs (T,)
        return Trajectories(
            torch.stack([s["latents"] for s in stored]),
            torch.stack([s["log_probs"] for s in stored]),
            stored[0]["timesteps"],
        )

    def published_prompts(self):
        """Prompts of the images published so far (index order); [] before the first batch."""
        if not os.path.exists(self.prompts_file):
            return []
        prompts = read_json(self.prompts_file, "prompt list")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"prompt list {self.prompts_file} is not a JSON list of prompts; move it aside and rerun")
        return prompts

    def publish(self, prompts):
        """Declare images 0..len(prompts)-1 complete: every file of theirs is on disk."""
        write_json(self.prompts_file, list(prompts))

    def read_scores(self):
        """Scores of images 0..n-1 (index order); [] before the first scored batch."""
        if not os.path.exists(self.scores_file):
            return []
        data = read_json(self.scores_file, "scores file")
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list) or data.get("count") != len(scores) or not all(map(is_number, scores)):
            raise UserError(f"scores file {self.scores_file} is malformed; move it aside and rerun the scorer")
        return [float(s) for s in scores]

    def forget_scores(self):
        """Remove the scores file: its scores belong to images no longer published (remade ones)."""
        if os.path.exists(self.scores_file):
            os.remove(self.scores_file)

    def scored_by(self):
        """The reward that made the saved scores (its label, e.g. "clip:1,pickscore:0.5"); None when
        nothing is scored yet or the file predates the record."""
        if not os.path.exists(self.scores_file):
            return None
        data = read_json(self.scores_file, "scores file")
        return data.get("reward") if isinstance(data, dict) else None

    def write_scores(self, scores, reward=None):
        """`reward`: the label of the reward that made them, recorded in the file."""
        write_json(self.scores_file, dict(count=len(scores), mean=mean(scores), scores=list(scores), reward=reward))


class EpochDir:
    def __init__(self, root):
        self.root = root
        self.sampled = ImageSet(root, "images", "prompt.json", "trajectories")
        self.injected = ImageSet(root, "injected_images", "injected_prompt.json", "injected_trajectories")

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def image_sets(self):
        """Every image set, in the order the loop makes them."""
        return [self.sampled, self.injected]

    @property
    def prompt_history_file(self):
        return self.path("eval", "prompt_history.json")

    def write_prompt_history(self, history):
        """history: {prompt: [{"epoch": k, "mean": m, "scores": [...]}, ...]}."""
        write_json(self.prompt_history_file, history)

    # --- D-Fusion's outputs: each target with copies of its reference and base, and the masks ---
    def target_files(self, target):
        """The files of target `target`: its image and trajectory, and the copies of its reference and base."""
        return self.injected.files(target) + [self.reference_image_path(target), self.base_image_path(target)]

    def reference_image_path(self, target):
        return self.path("ref_images", image_name(target))

    def base_image_path(self, target):
        return self.path("base_images", image_name(target))

    def save_pair_copies(self, target, base, reference):
        """Copy the base's and the reference's images/ PNGs beside target `target`."""
        copy_file(self.sampled.image_path(reference), self.reference_image_path(target))
        copy_file(self.sampled.image_path(base), self.base_image_path(target))

    def mask_path(self, index, item, step):
        """Picture of object `item`'s mask of sample `index` (images/ numbering) at step index `step`."""
        return self.path("mask", f"{index:05d}_item{item}_t{step:02d}.png")

    def saved_masks(self, index):
        """The mask pictures of sample `index` on disk: {item: {step: path}}."""
        folder, prefix = self.path("mask"), f"{index:05d}_item"
        masks = {}
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            item, _, step = name[len(prefix) : -len(".png")].partition("_t")
            if name.startswith(prefix) and name.endswith(".png") and item.isdigit() and step.isdigit():
                masks.setdefault(int(item), {})[int(step)] = os.path.join(folder, name)
        return masks

    @property
    def injected_map_file(self):
        return self.path("eval", "injected_map.json")

    def write_injected_map(self, pairs):
        """pairs: (base index, reference index) of each target, in target order."""
        write_json(self.injected_map_file, {str(t): [base, ref] for t, (base, ref) in enumerate(pairs)})

    def read_injected_map(self):
        """[(base index, reference index)] in target order; [] before fusion wrote it."""
        if not os.path.exists(self.injected_map_file):
            return []
        table = read_json(self.injected_map_file, "injected map")
        try:
            return [tuple(table[str(t)]) for t in range(len(table))]
        except (KeyError, TypeError):
            raise UserError(f"injected map {self.injected_map_file} is malformed; move it aside and rerun") from None


class CheckpointDir:
    """checkpoints/checkpoint_<epoch>/: the training state after an epoch."""

    LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(dir) looks for

    def __init__(self, root):
        self.root = root

    @property
    def epoch(self):
        return checkpoint_epoch(os.path.basename(os.path.normpath(self.root)))

    @property
    def lora_weights(self):
        return os.path.join(self.root, self.LORA_WEIGHTS)

    @property
    def state_tensors_file(self):
        return os.path.join(self.root, "training_state.safetensors")

    @property
    def state_file(self):
        return os.path.join(self.root, "training_state.json")

    def missing_files(self):
        """The names of the checkpoint's files that are not there."""
        files = (self.lora_weights, self.state_tensors_file, self.state_file)
        return [os.path.basename(f) for f in files if not os.path.isfile(f)]

    def is_checkpoint(self):
        return not self.missing_files()


def checkpoint_epoch(name):
    """k of a folder named checkpoint_<k>; None for any other name."""
    number = name[len("checkpoint_") :]
    return int(number) if name.startswith("checkpoint_") and number.isdigit() else None


def checkpoint_folders(folder):
    """Every checkpoint_<k> folder inside `folder`, complete or not, oldest epoch first."""
    if not os.path.isdir(folder):
        return []
    found = [CheckpointDir(os.path.join(folder, n)) for n in os.listdir(folder) if checkpoint_epoch(n) is not None]
    return sorted(found, key=lambda c: c.epoch)


def checkpoints_in(folder):
    """The complete checkpoint_<k> folders inside `folder`, oldest epoch first."""
    return [c for c in checkpoint_folders(folder) if c.is_checkpoint()]


def file_safe(label):
    """A reward's label as a file name: "clip:1,pickscore:0.5" -> "clip=1+pickscore=0.5"."""
    return label.replace(":", "=").replace(",", "+")


class HeldoutModelDir:
    """heldout/<prompt set>/<model>/: one model's held-out images, their scores by each reward and their
    diversity, and what made them."""

    def __init__(self, root):
        self.root = root
        self.name = os.path.basename(root)
        self.images = ImageSet(root, "images", "prompt.json")

    def scored(self, reward):
        """The images with their scores by `reward` (its label): eval/<label>_scores.json."""
        return ImageSet(self.root, "images", "prompt.json", scores_name=file_safe(reward))

    @property
    def diversity_file(self):
        return os.path.join(self.root, "eval", "diversity.json")

    @property
    def settings_file(self):
        return os.path.join(self.root, "settings.json")

    def read_settings(self):
        """{"sampling": what made the images, "scores": {reward label: what made its scores},
        "diversity": what made diversity.json}; None before the images are complete."""
        return read_json(self.settings_file, "held-out settings") if os.path.exists(self.settings_file) else None

    def write_settings(self, settings):
        """Written when the images are complete, then again after each reward's scores and the diversity."""
        write_json(self.settings_file, settings)

    def clear(self):
        shutil.rmtree(self.root, ignore_errors=True)


class HeldoutDir:
    """heldout/<prompt set>/: the held-out results of every model evaluated on one prompt file."""

    def __init__(self, root):
        self.root = root
        self.name = os.path.basename(root)

    def model(self, name):
        return HeldoutModelDir(os.path.join(self.root, name))

    @property
    def table_csv(self):
        return os.path.join(self.root, "table.csv")

    @property
    def table_json(self):
        return os.path.join(self.root, "table.json")

    def write_table(self, rows, rewards):
        """rows: dicts with the same keys in column order (first "prompt") -> table.csv and table.json;
        rewards: the labels of the rewards in the columns, in order (JSON only)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.table_csv, text.getvalue())
        write_json(self.table_json, dict(rows=rows, rewards=list(rewards)))

    def read_table(self):
        """{"rows": [...], "rewards": [...]}."""
        return read_json(self.table_json, "held-out table")


class ReportDir:
    """report/: the static HTML report and its pictures."""

    def __init__(self, root):
        self.root = root

    @property
    def index_html(self):
        return os.path.join(self.root, "index.html")

    def curves(self, name):
        return os.path.join(self.root, f"curves_{name}.png")

    def epoch_grid(self, k):
        return os.path.join(self.root, f"epoch{k}", "grid.png")

    def overlay(self, k, target):
        return os.path.join(self.root, f"epoch{k}", f"overlay_{image_name(target)}")


def check_exp_name(exp_name):
    """An experiment's name is one folder name inside save_path: not empty, no path separators, not . or .."""
    if not exp_name:
        raise UserError("config.exp_name is empty: name the experiment, e.g. --config.exp_name test")
    separators = [s for s in (os.sep, os.altsep, "\0") if s and s in exp_name]
    if separators or exp_name in (".", ".."):
        raise UserError(
            f"config.exp_name = {exp_name!r} is not a folder name: it may not hold path separators or be . or .. "
            "(the experiment lives in <save_path>/<exp_name>; set config.save_path to choose the parent folder)"
        )


# the processes that hold an experiment's lock: {role: the script that runs as it}
LOCK_ROLES = {"sampler": "run_sample.py", "scorer": "run_eval.py"}


class ExperimentDir:
    def __init__(self, save_path, exp_name):
        check_exp_name(exp_name)
        self.root = os.path.join(save_path, exp_name)

    @property
    def log_file(self):
        return os.path.join(self.root, "run.log")

    @property
    def eval_log_file(self):
        """run_eval.py's log."""
        return os.path.join(self.root, "eval.log")

    @property
    def config_file(self):
        return os.path.join(self.root, "config.json")

    def lock_file(self, role):
        return os.path.join(self.root, f"{role}.lock")

    def hold(self, role):
        """Context manager: this process is the experiment's only `role` ("sampler" or "scorer") while in it;
        a second one is refused at once, with the pid of the first."""
        script = LOCK_ROLES[role]

        def refusal(pid):
            return (
                f"process {pid} already runs as the {role} ({script}) of {self.root}: it holds "
                f"{self.lock_file(role)}. Wait for it to end, stop it, or use another exp_name"
            )

        return exclusive_lock(self.lock_file(role), refusal)

    def in_use(self, role):
        """Whether a process runs as the experiment's `role` now."""
        return is_locked(self.lock_file(role))

    def clear_sampler_scratch(self):
        """Remove the scratch entries a killed run left (see clear_scratch), except under report/ and heldout/
        (other scripts write there) and, while run_eval.py runs, under eval/; returns the removed paths."""
        skip = ("report", "heldout") + (("eval",) if self.in_use("scorer") else ())
        return clear_scratch(self.root, skip)

    def clear_scorer_scratch(self):
        """Remove the scratch entries under each epoch's eval/ (the scorer's files), unless a sampler runs:
        it writes there too. Returns the removed paths."""
        if self.in_use("sampler"):
            return []
        return [path for k in self.epochs() for path in clear_scratch(self.epoch(k).path("eval"))]

    @property
    def finished_file(self):
        return os.path.join(self.root, "finished.json")

    def epoch(self, k):
        return EpochDir(os.path.join(self.root, f"epoch{k}"))

    def epochs(self):
        """The numbers of the epochs that have a folder, in increasing order."""
        if not os.path.isdir(self.root):
            return []
        names = (name[len("epoch") :] for name in os.listdir(self.root) if name.startswith("epoch"))
        return sorted(int(k) for k in names if k.isdigit())

    @property
    def metrics_file(self):
        return os.path.join(self.root, "metrics.jsonl")

    @property
    def tensorboard_dir(self):
        return os.path.join(self.root, "tensorboard")

    @property
    def checkpoints(self):
        return os.path.join(self.root, "checkpoints")

    def checkpoint(self, epoch):
        return CheckpointDir(os.path.join(self.checkpoints, f"checkpoint_{epoch}"))

    def record_metrics(self, metrics):
        """Add the line of metrics["epoch"] to metrics.jsonl, dropping lines of that epoch or later (a rerun)."""
        kept = [line for line in self.read_metrics() if line["epoch"] < metrics["epoch"]]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in kept + [metrics])

        _atomic(self.metrics_file, write)

    def read_metrics(self):
        """The lines of metrics.jsonl (dicts with "epoch"), in epoch order; [] before the first trained epoch."""
        if not os.path.exists(self.metrics_file):
            return []
        with open(self.metrics_file) as f:
            try:
                return [json.loads(line) for line in f if line.strip()]
            except ValueError as error:  # json.JSONDecodeError, or UnicodeDecodeError for binary garbage
                raise UserError(f"metrics file {self.metrics_file} is corrupt ({error}); move it aside") from None

    @property
    def report(self):
        return ReportDir(os.path.join(self.root, "report"))

    def heldout(self, prompt_set):
        return HeldoutDir(os.path.join(self.root, "heldout", prompt_set))

    def heldout_sets(self):
        """The prompt sets with held-out results, by name."""
        folder = os.path.join(self.root, "heldout")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def mark_finished(self, num_epochs):
        write_json(self.finished_file, dict(num_epochs=num_epochs))

    def clear_finished(self):
        if os.path.exists(self.finished_file):
            os.remove(self.finished_file)

    def is_finished(self):
        return os.path.exists(self.finished_file)
