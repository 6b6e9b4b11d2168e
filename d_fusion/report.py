"""The experiment's report: data/<exp_name>/ -> report/index.html, epoch grids and curves (static, no server).

Per epoch, each target is a row reference | base | target | mask overlay with the scores and
the target-vs-base delta; curves follow the scores over epochs, the DPO loss and preference
accuracy of metrics.jsonl, and held-out scores when run_heldout.py has made some. index.html links
the experiment's own PNGs by relative paths inside data/<exp_name>/ (copy the whole folder to share
it); the epoch grids are single-file summaries. The pictures the report draws itself (overlays,
grids, curves) are redrawn only when older than a file they show, so rerunning it while a run goes
on redraws only what changed. An epoch still being sampled, scored or fused shows what is published.
"""

import html
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure  # a figure without pyplot: no backend, no global state
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from d_fusion.datadir import (
    EpochDir,
    ExperimentDir,
    checkpoint_epoch,
    mean,
    read_image,
    score_text,
    write_figure,
    write_image,
    write_text,
)
from d_fusion.errors import UserError
from d_fusion.logs import setup_logging

log = logging.getLogger(__name__)

COLUMNS = ("reference", "base", "target", "mask overlay")
MASK_COLOUR = np.array([255.0, 0.0, 0.0])
MASK_ALPHA = 0.45


def _at(scores, index):
    return scores[index] if index < len(scores) else None


def stale(output, inputs):
    """Whether `output` is missing or older than one of its existing inputs (as make decides)."""
    if not os.path.exists(output):
        return True
    made = os.path.getmtime(output)
    return any(os.path.exists(path) and os.path.getmtime(path) > made for path in inputs)


# ---------------------------------------------------------------- what the data directory holds


@dataclass
class TargetRow:
    """A target of an epoch, its reference and base (sample indices) and their scores (None: not yet)."""

    target: int
    prompt: str
    reference: int
    base: int
    reference_score: float | None
    base_score: float | None
    target_score: float | None
    target_published: bool
    masks: list  # the reference's object-mask pictures at the last saved step, one per object

    @property
    def delta(self):
        if self.target_score is None or self.base_score is None:
            return None
        return self.target_score - self.base_score


@dataclass
class EpochView:
    epoch: int
    folder: EpochDir
    prompts: list  # of the published samples (images/)
    scores: list  # of the samples scored so far
    target_scores: list  # of the targets scored so far
    rows: list  # TargetRow of every pair; [] before fusion

    @property
    def mean_delta(self):
        return mean([row.delta for row in self.rows if row.delta is not None])


def last_step_masks(epoch_dir, index):
    """Each object's mask picture of sample `index` at the last step that has one."""
    return [steps[max(steps)] for _, steps in sorted(epoch_dir.saved_masks(index).items())]


def read_epoch(experiment, k):
    epoch_dir = experiment.epoch(k)
    prompts, scores = epoch_dir.sampled.published_prompts(), epoch_dir.sampled.read_scores()
    num_targets, target_scores = len(epoch_dir.injected.published_prompts()), epoch_dir.injected.read_scores()
    rows = [
        TargetRow(
            target,
            prompts[base],
            reference,
            base,
            _at(scores, reference),
            _at(scores, base),
            _at(target_scores, target),
            target < num_targets,
            last_step_masks(epoch_dir, reference),
        )
        for target, (base, reference) in enumerate(epoch_dir.read_injected_map())
    ]
    return EpochView(k, epoch_dir, prompts, scores, target_scores, rows)


def heldout_tables(experiment):
    """{prompt set: its held-out table ({"rows", "rewards"})} of every prompt set run_heldout.py has a table of."""
    return {
        name: experiment.heldout(name).read_table()
        for name in experiment.heldout_sets()
        if os.path.exists(experiment.heldout(name).table_json)
    }


def heldout_means(tables):
    """{prompt set: {model: mean held-out score by the table's first reward}}, and that reward's label."""
    means, first = {}, None
    for name, table in tables.items():
        first = first or table["rewards"][0]
        prefix = f"{table['rewards'][0]}: "
        overall = table["rows"][-1]  # "all prompts"
        means[name] = {
            column[len(prefix) :]: value
            for column, value in overall.items()
            if column.startswith(prefix) and not column.endswith((" - base", " wins"))
        }
    return means, first


# ---------------------------------------------------------------- pictures: overlays and grids


def mask_overlay(image, mask_pictures):
    """The target image (H, W, 3) uint8 with the union of the object masks tinted red."""
    mask = np.zeros(image.shape[:2], dtype=bool)  # (H, W)
    for path in mask_pictures:
        picture = read_image(path).resize(image.shape[1::-1], Image.NEAREST)
        mask |= np.asarray(picture)[..., 0] > 127
    tint = MASK_ALPHA * mask[..., None]  # (H, W, 1)
    return (image * (1 - tint) + MASK_COLOUR * tint).round().astype(np.uint8)


def draw_overlays(report, view):
    """report/epoch<k>/overlay_<t>.png of every published target whose reference has masks: {target: path}."""
    overlays = {}
    for row in view.rows:
        if not (row.target_published and row.masks):
            continue
        path, target_image = report.overlay(view.epoch, row.target), view.folder.injected.image_path(row.target)
        if stale(path, [target_image, *row.masks]):
            write_image(path, mask_overlay(np.asarray(read_image(target_image)), row.masks))
        overlays[row.target] = path
    return overlays


def row_pictures(view, row, overlays):
    """The row's reference | base | target | mask overlay files (None: not made yet)."""
    target = view.folder.injected.image_path(row.target) if row.target_published else None
    return [view.folder.sampled.image_path(row.reference), view.folder.sampled.image_path(row.base), target, overlays.get(row.target)]


def row_caption(row):
    return (
        f"target {row.target}: {row.prompt}",
        f"reference {score_text(row.reference_score)}   base {score_text(row.base_score)}   "
        f"target {score_text(row.target_score)}   delta {score_text(row.delta, signed=True)}",
    )


def draw_grid(rows, captions, size):
    """A PIL image: a header, then per row two caption lines above its pictures (paths; None: grey tile)."""
    font, gap, line = ImageFont.load_default(size=14), 6, 18
    caption_height = 2 * line + gap
    width = len(COLUMNS) * (size + gap) + gap
    grid = Image.new("RGB", (width, line + gap + len(rows) * (caption_height + size + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(COLUMNS):
        draw.text((gap + c * (size + gap), gap // 2), name, fill="black", font=font)
    top = line + gap
    for pictures, caption in zip(rows, captions):
        for i, text in enumerate(caption):
            draw.text((gap, top + i * line), text, fill="black", font=font)
        top += caption_height
        for c, path in enumerate(pictures):
            tile = read_image(path).resize((size, size)) if path else Image.new("RGB", (size, size), "lightgrey")
            grid.paste(tile, (gap + c * (size + gap), top))
        top += size + gap
    return grid


def draw_epoch_grid(report, view, overlays, size):
    """report/epoch<k>/grid.png, redrawn when a file it shows changed; None before fusion."""
    if not view.rows:
        return None
    path = report.epoch_grid(view.epoch)
    pictures = [row_pictures(view, row, overlays) for row in view.rows]
    folder = view.folder
    # the manifests too: a target published now may have its PNG from before the last drawing
    inputs = [folder.injected_map_file, folder.injected.prompts_file]
    inputs += [folder.sampled.scores_file, folder.injected.scores_file]
    if stale(path, inputs + [p for row in pictures for p in row if p]):
        grid = draw_grid(pictures, [row_caption(row) for row in view.rows], size)
        write_image(path, np.asarray(grid))
    return path


# ---------------------------------------------------------------- curves


def _figure(num_panels):
    figure = Figure(figsize=(5 * num_panels, 3.5))
    axes = figure.subplots(1, num_panels, squeeze=False)
    for axis in axes[0]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    return figure, axes[0]


SCORE_SPAN = 0.05  # the least y range of a score plot: scores move by hundredths, not in their last digits
LOSS_SPAN = 0.05


def readable_y(axis, values, min_span, limits=None):
    """Plain tick labels (no offset label such as 1e-7+6.93147e-1) and a y range of `limits`, or of at
    least `min_span` around `values`, so that noise in their last digits does not fill the plot."""
    axis.ticklabel_format(axis="y", style="plain", useOffset=False)
    low, high = min(values), max(values)
    if limits:
        axis.set_ylim(*limits)
    elif high - low < min_span:
        middle = (low + high) / 2
        axis.set_ylim(middle - min_span / 2, middle + min_span / 2)


def score_curve(views):
    """Mean score of the samples and of the targets per epoch, labelled by the reward the score files
    record; None before any score."""
    samples = [(v.epoch, mean(v.scores)) for v in views if v.scores]
    targets = [(v.epoch, mean(v.target_scores)) for v in views if v.target_scores]
    if not samples:
        return None
    figure, (axis,) = _figure(1)
    for points, label in ((samples, "samples (images/)"), (targets, "targets (injected_images/)")):
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    readable_y(axis, [score for _, score in samples + targets], SCORE_SPAN)
    rewards = {v.folder.sampled.scored_by() for v in views if v.scores} - {None}
    reward = ", ".join(sorted(rewards)) or "clip"  # files written before the record: the CLIP score
    axis.set(xlabel="epoch", ylabel=f"mean score ({reward})", title=f"reward: {reward}")
    axis.legend()
    return figure


def training_curve(metrics):
    """The DPO loss and preference accuracy (when logged) per trained epoch; None before training."""
    if not metrics:
        return None
    names = [name for name in ("loss", "accuracy") if any(name in m for m in metrics)]
    figure, axes = _figure(len(names))
    for axis, name in zip(axes, names):
        points = [(m["epoch"], m[name]) for m in metrics if name in m]
        axis.plot(*zip(*points), marker="o")
        limits = (-0.05, 1.05) if name == "accuracy" else None  # a fraction
        readable_y(axis, [value for _, value in points], LOSS_SPAN, limits)
        axis.set(xlabel="epoch", ylabel=name, title=f"training {name}")
    return figure


def heldout_curve(means, reward):
    """Held-out mean score (by `reward`) of each checkpoint_<k> at epoch k; the base model as a dashed line."""
    if not means:
        return None
    figure, (axis,) = _figure(1)
    for prompt_set, models in means.items():
        epochs = {name: checkpoint_epoch(name) for name in models}
        points = sorted((epochs[name], mean) for name, mean in models.items() if epochs[name] is not None)
        line = axis.plot(*zip(*points), marker="o", label=prompt_set) if points else None
        if "base" in models:
            colour = line[0].get_color() if line else None
            axis.axhline(models["base"], linestyle="--", color=colour, label=f"{prompt_set}: base model")
    readable_y(axis, [mean for models in means.values() for mean in models.values()], SCORE_SPAN)
    axis.set(xlabel="epoch of the checkpoint", ylabel=f"mean {reward} score", title="held-out prompts")
    axis.legend()
    return figure


def update_curve(path, inputs, make_figure):
    """Redraw `path` when stale; returns it, or None while there is nothing to draw."""
    if stale(path, inputs):
        figure = make_figure()
        if figure is None:
            return None
        figure.tight_layout()
        write_figure(path, figure)
    return path


def draw_curves(experiment, views):
    """{name: PNG path or None} of the clip, training and heldout curves."""
    report = experiment.report
    score_files = [f for v in views for f in (v.folder.sampled.scores_file, v.folder.injected.scores_file)]
    heldout_files = [experiment.heldout(name).table_json for name in experiment.heldout_sets()]
    return dict(
        clip=update_curve(report.curves("clip"), score_files, lambda: score_curve(views)),
        training=update_curve(
            report.curves("training"), [experiment.metrics_file], lambda: training_curve(experiment.read_metrics())
        ),
        heldout=update_curve(
            report.curves("heldout"), heldout_files, lambda: heldout_curve(*heldout_means(heldout_tables(experiment)))
        ),
    )


# ---------------------------------------------------------------- the HTML page


def _src(path, root, versioned=False):
    """`path` relative to the report folder, as a URL; `versioned` adds the file's time against stale caches."""
    url = urllib.parse.quote(os.path.relpath(path, root).replace(os.sep, "/"))
    return f"{url}?v={int(os.path.getmtime(path))}" if versioned else url


def _score_cell(score, epoch, kind, index, signed=False):
    """A score with what it is as data attributes: kind "images", "injected_images" or "delta" (of a target)."""
    value = "" if score is None else f' data-score="{score!r}"'
    return (
        f'<span class="score" data-epoch="{epoch}" data-kind="{kind}" data-index="{index}"{value}>'
        f"{score_text(score, signed)}</span>"
    )


def _picture(src, caption=""):
    image = f'<img loading="lazy" src="{src}">' if src else '<div class="pending">not yet</div>'
    return f"<td>{image}{caption}</td>"


def target_row_html(view, row, overlays, root):
    reference, base, target, overlay = row_pictures(view, row, overlays)
    cells = [
        f"<td>{row.target}</td><td>{html.escape(row.prompt)}</td>",
        _picture(_src(reference, root), _score_cell(row.reference_score, view.epoch, "images", row.reference)),
        _picture(_src(base, root), _score_cell(row.base_score, view.epoch, "images", row.base)),
        _picture(
            target and _src(target, root), _score_cell(row.target_score, view.epoch, "injected_images", row.target)
        ),
        _picture(overlay and _src(overlay, root, versioned=True)),
        f'<td class="delta">{_score_cell(row.delta, view.epoch, "delta", row.target, signed=True)}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def samples_html(view, root):
    """Before fusion: the published samples with their scores so far."""
    cells = [
        f'<figure><img loading="lazy" src="{_src(view.folder.sampled.image_path(i), root)}"><figcaption>{i}: '
        f"{html.escape(prompt)}<br>{_score_cell(_at(view.scores, i), view.epoch, 'images', i)}</figcaption></figure>"
        for i, prompt in enumerate(view.prompts)
    ]
    return '<div class="samples">' + "".join(cells) + "</div>"


def epoch_html(view, overlays, grid, root):
    targets_scored = f", {len(view.target_scores)} of {len(view.rows)} targets scored" if view.rows else ""
    summary = (
        f"{len(view.prompts)} samples published, {len(view.scores)} scored{targets_scored}. "
        f"Mean score: samples {score_text(mean(view.scores))}, targets {score_text(mean(view.target_scores))}, "
        f"target - base {score_text(view.mean_delta, signed=True)}."
    )
    parts = [f'<h2 id="epoch{view.epoch}">Epoch {view.epoch}</h2>', f"<p>{summary}</p>"]
    if not view.rows:
        parts += ["<p>No pairs yet (fusion has not run for this epoch).</p>", samples_html(view, root)]
        return "\n".join(parts)
    if grid:
        parts.append(f'<p><a href="{_src(grid, root, versioned=True)}">grid.png</a> (the same rows as one picture)</p>')
    header = "".join(f"<th>{name}</th>" for name in ("#", "prompt", *COLUMNS, "target - base"))
    rows = "\n".join(target_row_html(view, row, overlays, root) for row in view.rows)
    parts.append(f'<table class="pairs"><tr>{header}</tr>\n{rows}</table>')
    return "\n".join(parts)


def table_html(rows):
    """Rows of dicts (held-out table) as an HTML table; deltas signed."""
    header = "".join(f"<th>{html.escape(column)}</th>" for column in rows[0])
    body = [
        "<tr>"
        + "".join(
            f"<td>{score_text(value, signed=column.endswith(' - base'))}</td>"
            if isinstance(value, float)
            else f"<td>{html.escape(str(value))}</td>"
            for column, value in row.items()
        )
        + "</tr>"
        for row in rows
    ]
    return f"<table><tr>{header}</tr>\n" + "\n".join(body) + "</table>"


def heldout_html(experiment):
    """Per prompt set: the overall row, then the per-prompt table folded."""
    parts = []
    for name, table in heldout_tables(experiment).items():
        rows = table["rows"]  # per prompt, then "all prompts"
        parts += [
            f"<h3>{html.escape(name)}</h3>",
            table_html(rows[-1:]),
            f"<details><summary>per prompt ({len(rows) - 1} prompts)</summary>{table_html(rows[:-1])}</details>",
        ]
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 4px; text-align: center; vertical-align: top; font-size: 13px; }
td img, .samples img { width: 160px; height: 160px; display: block; }
.pending { width: 160px; height: 160px; background: #ddd; line-height: 160px; color: #666; }
.samples { display: flex; flex-wrap: wrap; gap: 8px; }
.samples figure { margin: 0; width: 160px; font-size: 12px; }
.curves img { max-width: 100%; }
.score { font-family: monospace; }
"""


def page_html(experiment, views, curves, grids, overlays, finished):
    root = experiment.report.root
    status = "finished" if finished else "in progress (this page reloads every minute)"
    nav = " | ".join(f'<a href="#epoch{v.epoch}">epoch {v.epoch}</a>' for v in views)
    drawn = [f'<img src="{_src(path, root, versioned=True)}">' for path in curves.values() if path]
    parts = [
        f"<h1>D-Fusion: {html.escape(os.path.basename(experiment.root))}</h1>",
        f"<p>Run {status}; report updated {time.strftime('%Y-%m-%d %H:%M:%S')}. {nav}</p>",
        '<h2 id="curves">Curves</h2>',
        '<div class="curves">' + ("".join(drawn) or "<p>No scores yet.</p>") + "</div>",
    ]
    if not curves["training"]:
        parts.append("<p>No training metrics yet.</p>")
    heldout = heldout_html(experiment)
    if heldout:
        parts += ['<h2 id="heldout">Held-out prompts</h2>', heldout]
    parts += [epoch_html(v, overlays[v.epoch], grids[v.epoch], root) for v in views]
    refresh = "" if finished else '<meta http-equiv="refresh" content="60">'
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{refresh}<title>D-Fusion report</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------- entry points


def build_report(experiment, thumbnail=256):
    """Write report/ for the experiment's current state; returns the path of index.html."""
    if not os.path.isdir(experiment.root):
        raise UserError(f"{experiment.root} does not exist: check config.save_path and config.exp_name")
    finished = experiment.is_finished()  # read first: everything published by then is in this report
    report = experiment.report
    views = [read_epoch(experiment, k) for k in experiment.epochs()]
    overlays = {v.epoch: draw_overlays(report, v) for v in views}
    grids = {v.epoch: draw_epoch_grid(report, v, overlays[v.epoch], thumbnail) for v in views}
    curves = draw_curves(experiment, views)
    write_text(report.index_html, page_html(experiment, views, curves, grids, overlays, finished))
    return report.index_html


def run_report(config):
    """run_report.py: build the report; with report.watch, keep updating it until the run has finished."""
    setup_logging()
    experiment = ExperimentDir(config.save_path, config.exp_name)
    while True:
        finished = experiment.is_finished()
        index = build_report(experiment, config.report.thumbnail)
        log.info("report: %s", index)
        if finished or not config.report.watch:
            return index
        time.sleep(config.report.poll_interval)


def update_report(config, experiment):
    """The sampler's hook, after each epoch and at the end: rebuild the report when `report.each_epoch`."""
    if not config.report.each_epoch:
        return
    try:
        log.info("report: %s", build_report(experiment, config.report.thumbnail))
    except (UserError, OSError) as error:  # the run goes on; run_report.py shows the problem again
        log.warning("could not update the report: %s", error)
