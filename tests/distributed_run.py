"""run_sample.py for tests/test_distributed.py, started by torchrun: each process also saves its own LoRA.

After each epoch's training, process r writes its UNet's LoRA weights to
data/<exp_name>/lora_process<r>/ in the checkpoint format, so the test can compare the weights
the processes hold. Everything else is run_sample.py's run.
"""

import os

from d_fusion import distributed
from d_fusion.checkpoints import save_lora
from d_fusion.cli import main
from d_fusion.experiment import run_experiment
from d_fusion.stages import TrainingStage

train_epoch = TrainingStage.train_epoch


def train_epoch_and_save_lora(stage, epoch):
    metrics = train_epoch(stage, epoch)
    save_lora(stage.trainer.models.family, stage.trainer.state_dict()["lora"], os.path.join(stage.experiment.root, f"lora_process{distributed.rank()}"))
    return metrics


if __name__ == "__main__":
    TrainingStage.train_epoch = train_epoch_and_save_lora
    main(run_experiment)
