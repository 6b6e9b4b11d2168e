"""Scoring the experiment's images (SPEC section 1, step 3): run_eval.py's loop and the sampler's wait.

The scorer trusts only an image set's manifest (its prompt list, published after the images it
lists): it scores the listed images that have no score yet, in index order and in fixed
index-aligned chunks, and saves the scores after every chunk. A killed scorer restarts with the
chunk of its first image without a score. The sampler gets an epoch's scores through
`ScoreCollector.collect`: with `eval.inline` it scores in its own process with the same code,
otherwise it waits for run_eval.py.
"""

import logging
import time

from tqdm.auto import tqdm

from d_fusion import distributed
from d_fusion.cli import config_file
from d_fusion.datadir import ExperimentDir, read_image
from d_fusion.errors import UserError
from d_fusion.logs import log_cleared_scratch, setup_logging
from d_fusion.rewards import check_reward, load_scorer_from_config, parse_reward, reward_label
from d_fusion.settings import compare_scoring

log = logging.getLogger(__name__)


def saved_scores(image_set, num_published, reward):
    """The set's saved scores; more scores than published images means they belong to other images,
    scores of another reward than `reward` (its label) to another experiment's settings."""
    scored_by = image_set.scored_by()
    if scored_by not in (None, reward):
        raise UserError(
            f"{image_set.scores_file} holds scores of the reward {scored_by!r}, but this run scores with {reward!r} "
            "(config.eval.reward): run the sampler and run_eval.py with the experiment's reward, or use a new exp_name"
        )
    scores = image_set.read_scores()
    if len(scores) > num_published:
        raise UserError(
            f"{image_set.scores_file} holds {len(scores)} scores but {image_set.prompts_file} lists only "
            f"{num_published} images: the scores belong to an earlier run; move the eval/ folder aside and rerun"
        )
    return scores


def published_and_scored(image_set, reward):
    """(the listed prompts, their saved scores), as the main process reads them: every process of a
    run must agree on what is left to score even while run_eval.py writes the same files."""
    def read():
        prompts = image_set.published_prompts()
        return prompts, saved_scores(image_set, len(prompts), reward)

    return distributed.from_main(read)


def prompt_history(experiment, epoch, scores):
    """Per prompt, the scores of `images/` in every epoch up to `epoch` (whose scores so far are `scores`)."""
    history = {}
    for k in experiment.epochs():
        if k > epoch:
            break
        sampled = experiment.epoch(k).sampled
        epoch_scores = scores if k == epoch else sampled.read_scores()
        per_prompt = {}
        for prompt, score in zip(sampled.published_prompts(), epoch_scores):
            per_prompt.setdefault(prompt, []).append(score)
        for prompt, prompt_scores in per_prompt.items():
            mean = sum(prompt_scores) / len(prompt_scores)
            history.setdefault(prompt, []).append(dict(epoch=k, mean=mean, scores=prompt_scores))
    return history


def save_scores(experiment, epoch, image_set, scores, reward):
    epoch_dir = experiment.epoch(epoch)
    # the history first: the scores file is what marks a batch done, so a crash in between
    # only makes the scorer redo that batch and rewrite both
    if image_set.name == epoch_dir.sampled.name:
        epoch_dir.write_prompt_history(prompt_history(experiment, epoch, scores))
    image_set.write_scores(scores, reward)


def score_batch(scorer, image_set, prompts, start, batch_size):
    """Scores of the listed images start..start + batch_size - 1 (fewer at the end of the list)."""
    stop = min(start + batch_size, len(prompts))
    images = [read_image(image_set.image_path(i)) for i in range(start, stop)]
    return scorer.score(images, prompts[start:stop])


def score_new(scorer, experiment, epoch, image_set, batch_size, batch_delay=0.0):
    """Score the images the set's manifest lists and its scores lack, in index order; returns how many.

    Images are scored in fixed chunks, images [k * batch_size, (k + 1) * batch_size), so that the
    same images always meet in the same batch, however the publishing and the polling fall (a
    model's outputs depend on its batch in the last bits): a chunk scored while only partly listed
    is scored again, whole, when more of it is listed. In a run of K processes, process r scores
    chunk r of each round of K chunks; the main process saves the round's scores.
    """
    prompts, scores = published_and_scored(image_set, scorer.name)
    first = len(scores)
    if first == len(prompts):
        return 0
    for round_starts, start in distributed.rounds(range(first // batch_size * batch_size, len(prompts), batch_size)):
        batch_scores = score_batch(scorer, image_set, prompts, start, batch_size) if start is not None else []
        # index order: the scores before the round, then the round's chunks
        scores = scores[: round_starts[0]] + [s for part in distributed.gather(batch_scores) for s in part]
        distributed.on_main(save_scores, experiment, epoch, image_set, scores, scorer.name)
        done = len(scores)
        log.info(
            "epoch %d %s: scored %d-%d (%d listed)", epoch, image_set.name, round_starts[0], done - 1, len(prompts)
        )
        time.sleep(batch_delay)
    return len(prompts) - first


def score_pending(scorer, experiment, batch_size, batch_delay=0.0):
    """One pass over every epoch and image set, in order; returns the number of images scored."""
    return sum(
        score_new(scorer, experiment, k, image_set, batch_size, batch_delay)
        for k in experiment.epochs()
        for image_set in experiment.epoch(k).image_sets
    )


def check_eval_config(config, prompts=()):
    """Scoring settings that cannot work, and prompts the reward cannot score, fail at start-up."""
    if config.eval.batch_size < 1 or config.eval.poll_interval <= 0:
        raise UserError("config.eval.batch_size must be >= 1 and config.eval.poll_interval > 0")
    check_reward(config, prompts)


def run_scorer(config):
    """run_eval.py: score every new image of the experiment until Ctrl-C (or, if asked, until it is finished),
    as its only scorer; the log goes to data/<exp_name>/eval.log too."""
    check_eval_config(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    with experiment.hold("scorer"):
        setup_logging(experiment.eval_log_file)
        log_cleared_scratch(experiment.clear_scorer_scratch(), "scorer")
        compare_scoring(config, experiment)
        watch(config, experiment)


def watch(config, experiment):
    """Score new images until Ctrl-C, or until the sampler has finished (eval.exit_when_finished)."""
    ev = config.eval
    try:
        scorer = load_scorer_from_config(config)
        if not experiment.epochs():
            log.info(
                "no samples in %s yet: start run_sample.py with --config.exp_name %s", experiment.root, config.exp_name
            )
        log.info("watching %s for new images (Ctrl-C stops)", experiment.root)
        said_finished = False
        while True:
            finished = experiment.is_finished()  # read before the pass: everything published by then is scored
            if not score_pending(scorer, experiment, ev.batch_size, ev.debug_batch_delay):
                if finished and ev.exit_when_finished:
                    log.info("the sampler has finished and every image is scored: exiting")
                    return
                if finished and not said_finished:
                    log.info(
                        "%s is finished (finished.json) and every image is scored: nothing to do until a sampler "
                        "runs it again (Ctrl-C stops; --config.eval.exit_when_finished=True exits by itself)",
                        experiment.root,
                    )
                said_finished = finished
                time.sleep(ev.poll_interval)
    except KeyboardInterrupt:
        log.info("stopped")


class ScoreCollector:
    """The sampler's side: an image set's scores, computed in this process (`eval.inline`) or awaited."""

    def __init__(self, config, experiment):
        self.config = config
        self.experiment = experiment
        self.reward = reward_label(parse_reward(config.eval.reward))  # what the scores files must record
        self._scorer = None

    def scorer(self):
        if self._scorer is None:
            self._scorer = load_scorer_from_config(self.config)
        return self._scorer

    def collect(self, epoch, image_set):
        """The scores of every image the set has published (list of floats, index order).

        Inline scoring is split between the processes of an `accelerate launch` run; only the
        main process waits for run_eval.py, and sends the scores to the others.
        """
        ev = self.config.eval
        prompts, scores = published_and_scored(image_set, self.reward)
        count = len(prompts)
        if ev.inline and len(scores) < count:
            score_new(self.scorer(), self.experiment, epoch, image_set, ev.batch_size, ev.debug_batch_delay)
        return distributed.from_main(self.wait, epoch, image_set, count)

    def wait(self, epoch, image_set, count):
        """Poll the scores file until it holds `count` scores, saying once how to start a scorer if none comes."""
        ev = self.config.eval
        scores = saved_scores(image_set, count, self.reward)
        if len(scores) == count:
            return scores
        log.info(
            "epoch %d: waiting for run_eval.py to score %s (%d of %d scored)", epoch, image_set.name, len(scores), count
        )
        last_progress, warned = time.monotonic(), False
        with tqdm(total=count, initial=len(scores), desc=f"epoch {epoch} {image_set.name} scored", unit="image") as bar:
            while len(scores) < count:
                time.sleep(ev.poll_interval)
                new_scores = saved_scores(image_set, count, self.reward)
                if len(new_scores) > len(scores):
                    bar.update(len(new_scores) - len(scores))
                    last_progress = time.monotonic()
                elif not warned and time.monotonic() - last_progress >= ev.no_scorer_timeout:
                    log.warning(
                        "no new scores for %.0f s. Is the scorer running? Start it in another terminal with the same "
                        "exp_name and config: python run_eval.py --config %s --config.exp_name %s (and this run's "
                        "eval.* options), or rerun this command with --config.eval.inline=True to score in this "
                        "process",
                        ev.no_scorer_timeout,
                        config_file(),
                        self.config.exp_name,
                    )
                    warned = True
                scores = new_scores
        return scores
