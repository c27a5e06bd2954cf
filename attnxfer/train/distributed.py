"""Process-group start-up from the environment (one process, torchrun, a submitit/SLURM task, a plain
multi-task ``srun`` step), always by ``env://`` rendezvous, and the few collectives the loops share.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import InputError
from ..speak import debug
from .devices import Device
from .watchdog import HeartbeatWatchdog, collective_timeout, start_watchdog

#: Whether this process has created a process group of several ranks (process state, as torch.distributed's
#: own): `attnxfer.launch.process_exit` then ends the program without interpreter finalization.
_joined_a_group = False

#: the heartbeat watchdog of the group this process created (`init_distributed` with a timeout)
_watchdog: HeartbeatWatchdog | None = None


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job. ``world_size == 1`` means a plain single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistributedInfo:
        """The rank layout from torchrun's variables, derived first inside a submitit task (where the job's own
        win over a ``RANK`` inherited from the submitting shell: sbatch exports its environment)."""
        env = os.environ
        if env.get("SUBMITIT_EXECUTOR"):  # submitit started it (SLURM, local or debug)
            from submitit.helpers import TorchDistributedEnvironment

            # CUDA_VISIBLE_DEVICES is left alone: each task selects cuda:LOCAL_RANK itself, which also works
            # when SLURM already restricted the visible devices per task
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        elif (
            "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
        ):
            export_srun_environment()  # a task of a multi-task srun step that no launcher has described yet
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
            info = cls(
                rank=rank,
                local_rank=int(env.get("LOCAL_RANK", rank)),
                world_size=world_size,
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
            )
        except ValueError as e:
            raise InputError(f"distributed environment variables must be integers: {e}") from e
        if not 0 <= info.rank < info.world_size:
            raise InputError(f"RANK={info.rank} is outside [0, WORLD_SIZE={info.world_size})")
        return info


def export_srun_environment() -> None:
    """torchrun's variables from an ``srun`` step: one task per rank, the step's first node as master, the
    port ``MASTER_PORT`` or one derived from the job and step ids (every task picks the same, unasked)."""
    env = os.environ
    ntasks, nnodes = int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_STEP_NUM_NODES", "1") or 1)
    nodes = expand_node_list(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    job = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}"
    port = env.get("MASTER_PORT") or str(20000 + zlib.crc32(job.encode()) % 40000)
    env.update(
        MASTER_ADDR=nodes[0] if nodes else "127.0.0.1",
        MASTER_PORT=port,
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=str(ntasks),
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(max(1, ntasks // nnodes)),
    )


def expand_node_list(text: str) -> list[str]:
    """The host names of a SLURM node list, as ``scontrol show hostnames`` prints them: ``gpu[1-3,5],cpu7``
    -> gpu1 gpu2 gpu3 gpu5 cpu7; a range keeps its first number's zero padding (``n[08-10]``); several
    brackets in one name combine (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2)."""
    if not re.fullmatch(r"(?:[^\[\]]|\[[^\[\]]*\])*", text):  # brackets balanced, none nested
        raise InputError(f"node list {text!r}: unbalanced brackets")
    names: list[str] = []
    # the commas outside brackets: no "]" follows before a "["
    for group in filter(None, (g.strip() for g in re.split(r",(?![^\[]*\])", text))):
        parts = re.split(r"(\[[^\[\]]*\])", group)
        choices = [_expand_numbers(p[1:-1], text) if p.startswith("[") else [p] for p in parts]
        names.extend("".join(combo) for combo in itertools.product(*choices))
    return names


def _expand_numbers(spec: str, text: str) -> list[str]:
    """``1-3,5`` -> 1 2 3 5, each range zero-padded to the width of its first number."""
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise InputError(f"node list {text!r}: {item!r} is not a number or a range like 1-3")
        hi = hi if sep else lo
        if int(hi) < int(lo):
            raise InputError(f"node list {text!r}: range {item!r} runs backwards")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out


def backend_for(device: Device | str = Device.AUTO) -> str:
    """The process-group backend for a run on ``device`` (the config's auto | cpu | cuda): nccl when the
    run uses CUDA, gloo otherwise -- also on a GPU node whose run was told ``device=cpu``."""
    return "nccl" if Device(device).uses_cuda and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str | None = None, timeout: float | None = None) -> DistributedInfo:
    """Join the process group the environment describes; a no-op for one process and when a group exists
    (a submitted task may initialise it before a ``main`` that does again). On GPU the process binds
    ``cuda:LOCAL_RANK``. ``timeout`` (seconds): a heartbeat watchdog (`attnxfer.train.watchdog`) ends this
    process, naming the peer, once one has been silent that long; None: torch's default timeouts, no watchdog.
    """
    info = DistributedInfo.from_environment()
    if not info.is_distributed or dist.is_initialized():
        return info
    backend = backend or backend_for()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA; use backend='gloo' on CPU")
        # NCCL needs a GPU of its own per rank: fine where the scheduler binds GPUs per task (each task's
        # CUDA_VISIBLE_DEVICES); without a binding every rank sees the same GPUs. Said before CUDA fails
        # deep inside a barrier
        visible = torch.cuda.device_count()
        if info.local_world_size > visible and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise InputError(
                f"{info.local_world_size} ranks on this node but {visible} GPU(s) visible: NCCL needs one GPU "
                "per rank. Start at most one task per GPU (torchrun --nproc_per_node, attnxfer submit "
                "--gpus-per-node), or run the ranks on CPU with device=cpu (gloo)"
            )
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    kwargs = {} if timeout is None else {"timeout": timedelta(seconds=collective_timeout(timeout))}
    dist.init_process_group(
        backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size, **kwargs
    )
    global _joined_a_group, _watchdog
    _joined_a_group = True
    debug(
        f"joined process group: rank {info.rank}/{info.world_size} (local {info.local_rank}/"
        f"{info.local_world_size}) via {info.master_addr}:{info.master_port}, backend {backend}",
        all_ranks=True,
    )
    if timeout is not None:
        _watchdog = start_watchdog(timeout)
    return info


@contextlib.contextmanager
def joined_process_group(
    backend: str | None = None, timeout: float | None = None
) -> Iterator[DistributedInfo]:
    """`init_distributed` for the span of one run; the call that created the group closes it again, since a
    process exiting with its gloo group open can abort in its destructors. Only when the run ends normally:
    after an error, closing it would make the other ranks fail before this rank's error is on record."""
    owner = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(backend, timeout)
    yield info
    if owner and info.is_distributed:
        barrier()  # no rank closes its connections while a peer still finishes its last collective
        cleanup_distributed()


def joined_a_process_group() -> bool:
    """True once this process has created a process group of several ranks (even if it closed it since)."""
    return _joined_a_group


def barrier() -> None:
    """Wait for every rank. Not accelerate's ``wait_for_everyone``: it passes the device index even to a gloo
    group of CPU ranks, and on a one-GPU machine rank 1 then fails with "invalid device ordinal"."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group if one exists (safe to call always); its watchdog first, so that no peer
    takes this rank's leaving for a hang."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) without one."""
    joined = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)


def average_gradients(optimizer: torch.optim.Optimizer, flags: torch.Tensor | None = None) -> None:
    """Data-parallel stage 1: every rank steps with the mean gradient. ``flags`` (0/1 floats) ride in the same
    all-reduce and become 1 where any rank's was: stage 1's non-finite guard, at no extra collective."""
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    extra = [] if flags is None else [flags.reshape(-1).to(grads[0].dtype)]
    flat = torch.cat([g.reshape(-1) for g in grads] + extra)
    dist.all_reduce(flat)
    if flags is not None:
        flags.copy_((flat[-flags.numel() :] > 0).reshape(flags.shape))
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class RankAverage:
    """Stage 1's gradients in the accelerator's terms `train_step` uses: a plain backward, then every rank's
    gradients averaged (the fused AdamW's ``found_inf`` riding along); nothing accumulates."""

    sync_gradients = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def accumulate(self, *models: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        average_gradients(self.optimizer, getattr(self.optimizer, "found_inf", None))

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order: a collective for rare paths, not for steps."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    if rank_and_world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def min_over_ranks(value: torch.Tensor) -> int:
    """The smallest of every rank's 0-d integer ``value`` (on the group's device): a collective, one read."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
