"""Many processes (`accelerate launch --num_processes K`): who does which part of the epoch, and where they meet.

Process r of K takes whole units of work (a batch of one prompt, a chunk of pairs, a scoring batch)
in rounds of K units, unit r of each round. Only the main process writes the files that every
process shares (manifests, scores, maps, checkpoints, metrics); the others write only the files
of their own units. Every process calls every collective operation here in the same order, so
none waits forever. Without a launcher (one process) nothing is initialised and every function
is the identity or a plain call: single-process runs behave as before.
"""

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce


def _state():
    """The process group; `accelerate launch` (or torchrun) on a machine without CUDA gets gloo on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def world_size():
    return _state().num_processes


def rank():
    return _state().process_index


def is_main():
    return _state().is_main_process


def device_id(dev_id):
    """The CUDA device of this process: `dev_id` alone, the local process index under a launcher
    (each process gets its own GPU; pick them with `accelerate launch --gpu_ids`)."""
    return _state().local_process_index if world_size() > 1 else dev_id


def barrier():
    _state().wait_for_everyone()


def on_main(write, *args):
    """Run `write(*args)` on the main process once every process got here; all go on when it is done.

    Returns its result on the main process, None on the others.
    """
    barrier()
    result = write(*args) if is_main() else None
    barrier()
    return result


def from_main(compute, *args):
    """`compute(*args)` on the main process, its (picklable) result sent to every process."""
    return broadcast_object_list([compute(*args) if is_main() else None])[0]


def rounds(units):
    """`units` in rounds of one per process: yields (the round's units, this process's unit or None).

    Every process sees every round, so all meet at the collective operations that end a round.
    """
    units, size = list(units), world_size()
    for start in range(0, len(units), size):
        round_units = units[start : start + size]
        yield round_units, round_units[rank()] if rank() < len(round_units) else None


def shard(items):
    """This process's contiguous share of `items` (shares differ in length by at most one)."""
    items, size, r = list(items), world_size(), rank()
    return items[r * len(items) // size : (r + 1) * len(items) // size]


def gather(item):
    """[item of process 0, item of process 1, ...] on every process."""
    return gather_object([item])


def sum_gradients(params):
    """Replace each parameter's gradient by its sum over the processes (a process without data adds 0)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    total = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")  # (sum of numel,)
    for param, grad in zip(params, total.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)
