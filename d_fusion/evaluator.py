"""run_eval.py (docs/METHOD.md §1 step 3, §5): the scorer that watches data/<exp_name>/ and scores every new image.

The scorer trusts only an image set's manifest (its prompt list, published after the images it
lists): it scores the listed images that have no score yet, in index order and in fixed
index-aligned chunks, and saves the scores after every chunk (`stages.score_new`). A killed scorer
restarts with the chunk of its first image without a score. The sampler gets an epoch's scores
through `stages.ScoreCollector`: with `eval.inline` it scores in its own process with the same
code, otherwise it waits for run_eval.py.
"""

import logging
import time

from d_fusion.datadir import ExperimentDir
from d_fusion.errors import UserError
from d_fusion.logs import log_cleared_scratch, setup_logging
from d_fusion.rewards import check_reward, load_scorer_from_config
from d_fusion.settings import compare_scoring
from d_fusion.stages import score_pending

log = logging.getLogger(__name__)


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
