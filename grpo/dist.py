"""Data parallelism with PyTorch's own engine: `torchrun --nproc_per_node N train.py ...` wraps the policy in
DistributedDataParallel, or with `--fsdp` shards it with FSDP2 (`fully_shard`). A plain `python train.py` has no
process group, and every function here then leaves the single-process behaviour exactly as it was.

What each rank does alone, and where the ranks talk (train.py marks each such line `# distributed:`):
- prompts: rank r takes the r-th contiguous share of the step's B prompts, and generates, scores and computes
  advantages for it alone (a prompt's G completions stay on one rank, so advantages need no communication);
- sampling: seeded with (seed, step, rank), so ranks sample different completions; rank 0's stream is the
  single-process stream, so `torchrun --nproc_per_node 1` reproduces a plain run;
- old and reference log-probs: per rank, no communication (the reference model is a whole copy per rank);
- the loss: divided by the token count of the whole optimizer step summed over ranks (all-reduced before the
  first backward) and multiplied by the world size, because DDP and FSDP average gradients over ranks: the
  gradient is then exactly the single-process gradient of the whole batch;
- DDP all-reduces gradients in the last micro-batch's backward of each optimizer step (`no_sync` before it);
  FSDP reduce-scatters after every micro-batch, since holding whole gradients until the last one would cost
  the memory FSDP is there to save;
- rank 0 alone prints, logs and writes; the others wait at a barrier where it writes. Checkpoints hold whole
  tensors keyed by parameter name, so they load the same whichever number of ranks saved or resumes them.
"""
import builtins
import functools
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as td
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    return "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank (torchrun's RANK); 0 in a plain run."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the run (torchrun's WORLD_SIZE); 1 in a plain run. Readable before `setup`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup() -> None:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPU); otherwise do nothing.
    Ranks other than 0 print nothing and show no progress bars, so the console reads like a plain run."""
    if not launched() or td.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))          # "cuda" now means this rank's GPU
    td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if rank() != 0:                 # quiet, as torchvision's references do; errors still reach stderr
        builtins.print = lambda *args, **kwargs: None
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)


def barrier() -> None:
    """Wait until every rank gets here (after rank 0 wrote something the others read)."""
    if td.is_initialized():
        td.barrier()


def shard(items: list) -> list:
    """This rank's contiguous share of `items` (len(items) is divisible by the world size)."""
    n = len(items) // world_size()
    return items[rank() * n:(rank() + 1) * n]


def _comm_device() -> torch.device:
    """Where collectives run: NCCL moves GPU tensors only, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks, on x's device (a new tensor; x itself is unchanged)."""
    if not td.is_initialized():
        return x.clone()
    total = x.to(_comm_device(), copy=True)
    td.all_reduce(total)
    return total.to(x.device)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (equal shapes), concatenated in rank order along dim 0, on x's device."""
    if not td.is_initialized():
        return x
    x_comm = x.to(_comm_device()).contiguous()
    parts = [torch.empty_like(x_comm) for _ in range(world_size())]
    td.all_gather(parts, x_comm)
    return torch.cat(parts).to(x.device)


def mean_over_ranks(metrics: dict) -> dict:
    """Float metrics averaged over ranks, in one all-reduce; ints (step, epoch, skipped steps) are equal on
    every rank and kept. Each rank's mean over its equal share becomes the mean over the whole batch."""
    if not td.is_initialized():
        return metrics
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    values = sum_over_ranks(torch.tensor([metrics[k] for k in keys], dtype=torch.float64)) / world_size()
    return {**metrics, **dict(zip(keys, values.tolist()))}


def wrap(policy: nn.Module, fsdp: bool) -> nn.Module:
    """The policy as the loss calls it: DDP (or FSDP2 with `fsdp`) under torchrun; itself in a plain run.

    The wrapped module is CompletionLogprobs, not the HF model, so that gradient hooks fire on exactly the
    forward the loss uses. The HF model inside stays reachable for generation and saving.
    """
    if not td.is_initialized():
        return policy
    if not fsdp:
        # Buffers (rotary frequencies) are equal on every rank: broadcasting them would put a collective
        # into every forward, the no-grad log-prob passes included.
        return DistributedDataParallel(policy, forward_sync_buffers=False)
    for p in policy.parameters():                     # start from rank 0's weights, as DDP does on its own
        td.broadcast(p.detach(), src=0)
    for layer in policy.model.base_model.layers:      # one all-gather per decoder layer in forward and backward
        fully_shard(layer)
    fully_shard(policy)                               # the rest (embeddings, final norm, LM head) in one group
    # FSDP takes the module of the first forward as its root. Generation calls the layers directly, so run
    # one tiny forward through the policy now, before generation can; then shard the root's parameters again,
    # which FSDP leaves whole after a forward, so that the optimizer is built on the shards.
    device = next(policy.parameters()).device
    with torch.no_grad():
        policy(torch.zeros(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device),
               torch.ones(1, 1, dtype=torch.bool, device=device))
    policy.reshard()
    return policy


def no_sync(policy: nn.Module, sync: bool):
    """Context for one micro-batch's forward: under DDP, gradients are all-reduced in its backward only when
    `sync` (the last micro-batch of an optimizer step) and accumulate locally before that. FSDP and plain runs:
    nothing to do."""
    return policy.no_sync() if isinstance(policy, DistributedDataParallel) and not sync else nullcontext()


@contextmanager
def full_weights(policy: nn.Module):
    """FSDP: every rank holds the whole parameters inside the block (generation), and the shards again after.

    Generation calls the model's layers directly, once per new token, and ranks stop at different lengths, so a
    gather in each forward would leave ranks waiting on collectives the others never join. One gather per
    rollout instead; cost: a whole copy of the weights in memory while generating. DDP and plain runs keep whole
    weights anyway.
    """
    modules = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not policy, recurse=False)   # FSDP's defaults: the root keeps its own
            m.reshard()


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, weights: bool = True) -> tuple[dict, dict]:
    """Model and optimizer state dicts with whole tensors on CPU, keyed by parameter name: the same whether
    saved by 1 or N ranks, sharded or not. A collective under FSDP (every rank calls it); rank 0 gets the
    tensors, the others empty dicts. (If no optimizer step has run yet, this creates AdamW's state with a
    zero-learning-rate step.) `weights=False`: an empty model state (LoRA saves its adapters itself)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not weights:
        return {}, get_optimizer_state_dict(model, optimizer, options=options)
    model_state = get_model_state_dict(model, options=options)
    # Tied weights (Qwen's input and output embeddings) come back from FSDP as two gathered copies: keep the one
    # name that named_parameters() keeps, as save_pretrained does for tensors that still share memory.
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    model_state = {name: tensor for name, tensor in model_state.items() if name in names}
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state from `full_state_dicts`, saved by any number of ranks."""
    if _is_sharded(model):                            # FSDP: each rank keeps its slice of every tensor
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:                                             # keys are parameter names, in the optimizer's order
        optimizer.load_state_dict(state)
