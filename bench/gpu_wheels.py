"""The requirements ``make gpu-wheels`` downloads: the small dependencies at this virtualenv's
versions (so the GPU machine runs what was tested here), plus the big ones named as arguments."""

from __future__ import annotations

import sys
from importlib import metadata

SMALL = (
    "annotated-types", "typing-inspection", "pydantic-core", "pydantic", "msgpack", "PyYAML", "mdurl",
    "markdown-it-py", "pygments", "rich", "accelerate", "peft", "dill", "multiprocess", "xxhash",
    "datasets", "trl",
)  # fmt: skip
#: Not installed here (its kernels are Triton: GPU only): the version FACTS.md found on the registry.
GPU_ONLY = ("liger-kernel==0.8.5",)


def pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


if __name__ == "__main__":
    print(" ".join([*(pinned(n) for n in (*SMALL, *sys.argv[1:])), *GPU_ONLY]))
