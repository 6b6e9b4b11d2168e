"""The epoch's prompts: one prompt or a prompt file, expanded to one entry per sample."""

from d_fusion.datadir import read_json
from d_fusion.errors import UserError


def load_prompts(config):
    """The prompt list, in file order: `prompt_file` (a JSON list) when set, else [`prompt`]."""
    if not config.prompt_file:
        return [config.prompt]
    return read_prompt_file(config.prompt_file)


def read_prompt_file(path):
    """A prompt file: a non-empty JSON list of prompts."""
    prompts = read_json(path, "prompt file")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompt file {path} must hold a non-empty JSON list of strings")
    return prompts


def epoch_samples(prompts, batch_size, num_batches_per_epoch):
    """The prompt of every sample of an epoch, in sample-index order (batches never mix prompts)."""
    return [p for p in prompts for _ in range(batch_size * num_batches_per_epoch)]
