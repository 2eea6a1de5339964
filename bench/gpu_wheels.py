"""What a lent GPU machine may lack, in one list, for ``make gpu-wheels`` here and
``bench/gpu_device.sh`` there.

    python bench/gpu_wheels.py [BIG ...]   # requirements to download: the small ones at this
                                           # virtualenv's versions, plus the big ones named
    python bench/gpu_wheels.py --missing   # distributions whose module this Python cannot import
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata

#: module -> distribution, in the order pip should install them (dependencies first).
PACKAGES = {
    "annotated_types": "annotated-types", "typing_inspection": "typing-inspection",
    "pydantic_core": "pydantic-core", "pydantic": "pydantic", "msgpack": "msgpack", "yaml": "PyYAML",
    "mdurl": "mdurl", "markdown_it": "markdown-it-py", "pygments": "pygments", "rich": "rich",
    "accelerate": "accelerate", "peft": "peft", "dill": "dill", "multiprocess": "multiprocess",
    "xxhash": "xxhash", "pyarrow": "pyarrow", "pandas": "pandas", "datasets": "datasets",
    "trl": "trl", "liger_kernel": "liger-kernel", "bitsandbytes": "bitsandbytes",
}  # fmt: skip
#: Too big to carry all at once (64 MiB a run): downloaded only when named.
BIG = ("pyarrow", "pandas", "bitsandbytes")
#: Not installed here (its kernels are Triton: GPU only): the version FACTS.md found on the registry.
UNPINNED = {"liger-kernel": "liger-kernel==0.8.5"}


def pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return UNPINNED.get(name, name)


if __name__ == "__main__":
    if sys.argv[1:] == ["--missing"]:
        print(" ".join(d for m, d in PACKAGES.items() if importlib.util.find_spec(m) is None))
    else:
        small = [d for d in PACKAGES.values() if d not in BIG]
        print(" ".join(pinned(n) for n in (*small, *sys.argv[1:])))
