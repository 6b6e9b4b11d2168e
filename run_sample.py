"""Sampler, D-Fusion and training: `python run_sample.py --config config/config.py:tiny --config.exp_name demo`."""

from d_fusion.cli import main
from d_fusion.experiment import run_experiment

if __name__ == "__main__":
    main(run_experiment)
