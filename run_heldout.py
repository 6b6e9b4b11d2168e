"""Held-out evaluation: `python run_heldout.py --config.exp_name demo --config.heldout.checkpoint data/demo/checkpoints`.

Samples the held-out prompts (`heldout.prompt_file`) with the base model and each checkpoint on the same
seeds, scores them with the CLIP scorer, and writes data/<exp_name>/heldout/<prompt set>/table.csv.
"""

from d_fusion.cli import main
from d_fusion.heldout import run_heldout

if __name__ == "__main__":
    main(run_heldout)
