"""CLIP scorer: `python run_eval.py --config.exp_name demo` scores every new image of data/demo/ until Ctrl-C."""

from d_fusion.cli import main
from d_fusion.evaluator import run_scorer

if __name__ == "__main__":
    main(run_scorer)
