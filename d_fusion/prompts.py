"""The epoch's prompts: one prompt or a prompt file, expanded to one entry per sample."""

import logging

from d_fusion.datadir import read_json
from d_fusion.errors import UserError

log = logging.getLogger(__name__)


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


def warn_long_prompts(tokenizer, prompts):
    """Warn once per prompt that has more tokens than the text encoder reads: it is cut (as the release
    cuts it), and the warning says where."""
    room = tokenizer.model_max_length - 2  # the start and end tokens take two places
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        if len(ids) > room:
            log.warning(
                "the prompt %r has %d tokens, more than the %d the text encoder reads: it is cut after %r "
                "(%r is ignored)",
                prompt,
                len(ids),
                room,
                tokenizer.decode(ids[:room]),
                tokenizer.decode(ids[room:]),
            )
