"""What each torchrun process runs: the single-process training job, reporting over the relay.

``python -m finetune_worker.training.distributed.rank_main --launch LAUNCH.json --relay SOCKET`` (torchrun
sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous variables). The job itself is
``training.job.run``, unchanged, with a context whose ``emit`` sends frames to the worker:
rank 0 sends every event, the other ranks only their own failure. Cancel is a stop file the
launcher writes; every rank looks at it at the same points and the ranks agree with an
all_reduce, so all of them stop at the same step and rank 0's checkpoint is consistent.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from finetune_worker.context import JobContext
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.training.distributed.relay import RelayClient

# Same reason as in training.job: spinning OpenMP threads collapse CPU training under contention.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("finetune_worker.training.distributed.rank")

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent (torchrun's agent) dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's killpg still covers us
        return


class AgreedStop:
    """A cancel flag that every rank reads the same way at the same point of the job.

    ``is_set`` ORs this rank's view (a local request or the launcher's stop file) over all
    ranks, so a rank that saw the file a moment later still stops at the same step as the rest.
    Every rank calls it at the same points (the job's code path is the same on every rank).
    """

    def __init__(self, stop_file: Path, device: Any = None):
        self._local = threading.Event()
        self._file = stop_file
        self._device = device
        self._agreed = False

    def set(self) -> None:
        self._local.set()

    def is_set_here(self) -> bool:
        """This rank's own view, without asking the others (see ``JobContext.check_cancelled_alone``)."""
        return self._agreed or self._local.is_set() or self._file.exists()

    def is_set(self) -> bool:
        if self._agreed:
            return True
        local = self._local.is_set() or self._file.exists()
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self._device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = bool(flag.item())
        self._agreed = local
        return local


class RankContext(JobContext):
    """The :class:`~finetune_worker.context.JobContext` of one torchrun rank: events go through
    the relay (rank 0 only), the cancel flag is the stop all ranks agree on."""

    def __init__(
        self,
        client: RelayClient,
        config: Any,
        job_id: str,
        rank: int,
        resume_from: Path | None,
        cancel_event: AgreedStop,
    ):
        self._client = client
        self.config = config
        self.job_id = job_id
        self.kind = "train"
        self.rank = rank
        self.resume_from = resume_from
        self.cancel_event = cancel_event

    def emit(self, type: str, **payload: Any) -> None:
        # Rank 0 speaks for the job: one event per step, not one per rank.
        if self.rank == 0:
            self._client.send(type, **payload)


def _backend(requested: str, rank: int) -> tuple[str, Any]:
    """The collective backend and the device its tensors live on; nccl needs a GPU per rank."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "nccl" and not cuda:
        raise JobFailed(
            "invalid_config",
            f"distributed.backend: nccl needs CUDA GPUs, and rank {rank} sees none",
            hint='Use "backend": "gloo" (or "auto") on CPU machines.',
        )
    backend = requested if requested != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return backend, torch.device("cuda", local_rank) if backend == "nccl" else None
    return backend, None


def run_rank(launch_path: Path, client: RelayClient, rank: int) -> int:
    """Run the job on this rank; report how it ended; return the exit status."""
    from finetune_worker.config.train import TrainConfig

    launch = json.loads(launch_path.read_text())
    cfg = TrainConfig.model_validate(launch["config"])
    if rank != 0:
        cfg = cfg.model_copy(update={"tracking": None})  # one tracked run, from rank 0
    assert cfg.distributed is not None
    backend, device = _backend(cfg.distributed.backend, rank)

    import torch.distributed as dist

    # Initialized here rather than by the Trainer, so that the cancel flag agrees across ranks
    # from the job's first check on; accelerate adopts an existing process group.
    dist.init_process_group(backend=backend)
    stop = AgreedStop(Path(launch["stop_file"]), device)
    resume = launch.get("resume_from")
    ctx = RankContext(client, cfg, launch["job_id"], rank, Path(resume) if resume else None, stop)

    from finetune_worker.training.job import run

    result = run(ctx)
    # Every rank says how it ended, so that the launcher can tell a clean exit from a silent death.
    client.send("completed", result=result if rank == 0 else {})
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_worker.training.distributed.rank_main")
    parser.add_argument("--launch", required=True, help="launch JSON written by the worker's launcher")
    parser.add_argument("--relay", required=True, help="Unix socket of the worker's event relay")
    args = parser.parse_args(argv)

    die_with_parent()
    if os.getppid() == 1:  # the agent died before the death signal was armed
        return 1
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    client = RelayClient(args.relay, rank)
    client.send(
        "hello",
        pid=os.getpid(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    try:
        code = run_rank(Path(args.launch), client, rank)
    except JobCancelled as exc:
        client.send("cancelled", step=exc.step, checkpoint=exc.checkpoint)
        code = 0
    except JobFailed as exc:
        client.send("failed", error=exc.error, message=exc.message, hint=exc.hint)
        code = 1
    except BaseException as exc:  # whatever it was, the worker must hear of it
        traceback.print_exc()
        client.send(
            "failed",
            error="internal_error",
            message=f"{type(exc).__name__}: {exc}",
            hint="See the worker's stderr log for this rank's traceback.",
        )
        code = 1
    client.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        # Peers may still sit in a collective with us: do not wait for the process group's teardown.
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
