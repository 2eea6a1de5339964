"""Test support: the harness that plays the BEAM's side of the port, the test-only job kind, and
the tiny model the demo and the tests train. Nothing in the product imports these, except the
CLI's ``make-tiny-model`` command (the demo's model builder).

``from finetune_worker.testing import WorkerHarness`` is the public entry (see
:mod:`finetune_worker.testing.harness`).
"""

from finetune_worker.testing.harness import (
    HarnessEvent,
    RemoteError,
    Reply,
    WorkerHarness,
    make_pid,
    make_ref,
)

__all__ = ["HarnessEvent", "RemoteError", "Reply", "WorkerHarness", "make_pid", "make_ref"]
