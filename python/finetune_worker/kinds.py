"""The one registry of job kinds: what each is called, its config schema, how to run it, and how
to recognise a config written without ``"job"`` (the seed formats).

A kind is declared by the module that holds its config schema, as a module-level ``KINDS``
tuple of :class:`JobKind` (``finetune_worker.config.train``, ``.merge``, ``.evaluate``). The
registry finds them by scanning the ``finetune_worker.config`` package, so adding a kind is
adding one module there (its schema, its ``KINDS``, and a ``run`` function it names), plus its
tests; nothing else changes. Modules named in ``FINETUNE_WORKER_KIND_MODULES`` (comma
separated, an operator's setting, never the peer's) are scanned too, which is how plugins add
kinds, and ``FINETUNE_WORKER_TEST_JOBS=1`` adds the test-only ``test_steps`` kind from
:mod:`finetune_worker.testing.testjobs`.

Declaring modules must stay light (pydantic, no torch): they are imported on the first
``validate``/``submit``. A kind's ``run`` is named as ``"module:function"`` and imported on the
runner thread when a job of that kind starts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_TEST_JOBS = "FINETUNE_WORKER_TEST_JOBS"
ENV_KIND_MODULES = "FINETUNE_WORKER_KIND_MODULES"
TEST_KINDS_MODULE = "finetune_worker.testing.testjobs"


@dataclass(frozen=True)
class JobKind:
    """One job kind. ``recognise`` gets a config's top-level keys (for configs without ``"job"``);
    kinds are asked in ``order``, lowest first, and the first that says yes wins."""

    name: str
    config: type[Any]  # a pydantic model class
    run: str  # "module:function", the handler: run(ctx: JobContext) -> dict
    recognise: Callable[[set[str]], bool] | None = None
    order: int = 100
    test_only: bool = False

    def handler(self) -> Callable[..., Any]:
        """The run function, imported now (on the runner thread: it pulls in torch)."""
        module_name, func_name = self.run.split(":")
        func: Callable[..., Any] = getattr(importlib.import_module(module_name), func_name)
        return func


def test_jobs_enabled() -> bool:
    """Test-only kinds exist only when the worker was started with FINETUNE_WORKER_TEST_JOBS=1."""
    return os.environ.get(ENV_TEST_JOBS) == "1"


CONFIG_PACKAGE = "finetune_worker.config"


def _declaring_modules() -> tuple[str, ...]:
    # Found by name, not imported here: the config package imports this module.
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    paths = list(spec.submodule_search_locations or []) if spec is not None else []
    names = [f"{CONFIG_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(paths)]
    extra = [m.strip() for m in os.environ.get(ENV_KIND_MODULES, "").split(",") if m.strip()]
    if test_jobs_enabled():
        extra.append(TEST_KINDS_MODULE)
    return (*sorted(names), *extra)


@functools.cache
def _scan(modules: tuple[str, ...]) -> dict[str, JobKind]:
    found: dict[str, JobKind] = {}
    for name in modules:
        for kind in getattr(importlib.import_module(name), "KINDS", ()):
            if kind.name in found:
                raise RuntimeError(f"job kind {kind.name!r} is declared twice ({name})")
            found[kind.name] = kind
    return found


def all_kinds() -> dict[str, JobKind]:
    """Every kind this worker knows, by name (test-only ones only when enabled)."""
    return {k: v for k, v in _scan(_declaring_modules()).items() if test_jobs_enabled() or not v.test_only}


def get(name: str) -> JobKind | None:
    return all_kinds().get(name)


def production_kinds() -> dict[str, JobKind]:
    """The kinds a production worker runs (what ``finetune-worker schema`` describes)."""
    return {k: v for k, v in all_kinds().items() if not v.test_only}


def recognise(keys: set[str]) -> JobKind | None:
    """The kind a config without ``"job"`` is, from its keys, or None."""
    for kind in sorted(all_kinds().values(), key=lambda k: k.order):
        if kind.recognise is not None and kind.recognise(keys):
            return kind
    return None
