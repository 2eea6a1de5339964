"""The ``distributed`` block of a train config: how torchrun spreads one job over processes.

``{"nproc_per_node": 2, "backend": "gloo" | "nccl"}`` is promised to users and valid as written;
everything else has a default that suits one machine. Nothing here imports torch: ``submit``
must answer at once, so the checks that need a device (nccl without CUDA) run at launch.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field

from finetune_worker.config.base import StrictModel
from finetune_worker.errors import ConfigIssue

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class DistributedConfig(StrictModel):
    """One training job as a torchrun process group (one process per device)."""

    nproc_per_node: int = Field(
        1, gt=0, le=1024, description="Processes on this node: one per GPU, or a few on CPU."
    )
    nnodes: int = Field(1, gt=0, le=4096, description="Machines in the job; each runs its own worker.")
    node_rank: int = Field(0, ge=0, description="This machine's index among nnodes (0 hosts the master).")
    master_addr: str = Field(
        "127.0.0.1", min_length=1, description="Address of node 0, reachable from every node."
    )
    master_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="TCP port on node 0 for the rendezvous; default: a free port (single node only).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto: nccl on CUDA, gloo on CPU."
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp replicates the model on every process; fsdp shards it (for models that do not "
        "fit one device); deepspeed needs the deepspeed package.",
    )
    deepspeed_config: str | None = Field(
        None, description="strategy deepspeed: path to a DeepSpeed JSON config (ZeRO stage etc.)."
    )
    stop_timeout_s: float = Field(
        60.0,
        gt=0,
        description="After a cancel or a failed rank, how long the processes get to stop by themselves "
        "before the whole process group is killed.",
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def trainer_arguments(self) -> dict[str, Any]:
        """Extra ``TrainingArguments`` for this strategy (read inside each rank)."""
        args: dict[str, Any] = {}
        if self.backend != "auto":
            args["ddp_backend"] = self.backend
        if self.strategy == "ddp":
            # Adapters train every parameter they add: skipping the unused-parameter scan is safe.
            args["ddp_find_unused_parameters"] = False
        elif self.strategy == "fsdp":
            args["fsdp"] = "full_shard auto_wrap"
        elif self.strategy == "deepspeed" and self.deepspeed_config is not None:
            args["deepspeed"] = self.deepspeed_config
        return args

    def issues(self, prefix: str = "distributed") -> list[ConfigIssue]:
        """Cross-field problems, each named by its JSON path."""
        found: list[ConfigIssue] = []
        if self.node_rank >= self.nnodes:
            found.append(
                ConfigIssue(
                    f"{prefix}.node_rank",
                    f"node_rank counts from 0 and must be below nnodes ({self.nnodes})",
                    self.node_rank,
                )
            )
        if self.nnodes > 1 and self.master_port is None:
            found.append(
                ConfigIssue(
                    f"{prefix}.master_port",
                    "a multi-node job needs an explicit master_port, the same on every node",
                )
            )
        if self.nnodes > 1 and self.master_addr in LOOPBACK:
            found.append(
                ConfigIssue(
                    f"{prefix}.master_addr",
                    "a multi-node job needs node 0's address as the other nodes reach it, not loopback",
                    self.master_addr,
                )
            )
        if self.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            found.append(
                ConfigIssue(
                    f"{prefix}.strategy",
                    "deepspeed is not installed in the worker's environment; use 'ddp' or 'fsdp', "
                    "or install deepspeed",
                    self.strategy,
                )
            )
        if self.strategy == "deepspeed" and self.deepspeed_config is None:
            found.append(
                ConfigIssue(
                    f"{prefix}.deepspeed_config",
                    "strategy 'deepspeed' needs deepspeed_config: the path of a DeepSpeed JSON config",
                )
            )
        if self.deepspeed_config is not None and self.strategy != "deepspeed":
            found.append(
                ConfigIssue(
                    f"{prefix}.deepspeed_config",
                    "deepspeed_config applies to strategy 'deepspeed' only",
                    self.deepspeed_config,
                )
            )
        return found
