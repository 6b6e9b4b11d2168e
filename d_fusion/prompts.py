"""The epoch's prompts: one prompt or a prompt file, and the epoch's layout of samples."""

import logging
from dataclasses import dataclass


from d_fusion.datadir import read_json
from d_fusion.errors import UserError
from d_fusion.sampling import sample_generators

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


@dataclass(frozen=True)
class EpochLayout:
    """Which sample is which, the same in every epoch and every process.

    Prompt p (file order) owns samples p * n .. (p + 1) * n - 1, n = samples_per_prompt =
    batch_size * num_batches; a batch is batch_size consecutive samples of one prompt. Sample j of
    epoch k draws all its noise from a generator seeded seed + k * num_samples + j, so it regenerates
    exactly, alone or in any batch.
    """

    prompts: tuple  # the prompt list, in file order
    batch_size: int  # samples per batch of one prompt (sample.batch_size)
    num_batches: int  # batches per prompt per epoch (sample.num_batches_per_epoch)
    seed: int

    @property
    def samples_per_prompt(self):
        return self.batch_size * self.num_batches

    @property
    def sample_prompts(self):
        """The prompt of every sample, in sample-index order."""
        return [p for p in self.prompts for _ in range(self.samples_per_prompt)]

    @property
    def num_samples(self):
        return len(self.prompts) * self.samples_per_prompt

    def batches(self, first=0):
        """(start, stop) of every batch from sample `first` (a batch start) on."""
        return [(start, start + self.batch_size) for start in range(first, self.num_samples, self.batch_size)]

    def generators(self, epoch, indices):
        """One fresh CPU generator per sample index in `indices`."""
        return sample_generators(self.seed, epoch, self.num_samples, indices)


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
