"""Lets PyPI's CUDA-only torchvision import beside the CPU torch in the vLLM venv (scripts/vllm_env.sh).

torchvision's _meta_registrations registers fake kernels for torchvision::nms and ::qnms without checking
that its _C.so (which needs libtorch_cuda) defined them. Before torchvision's first import this defines the
two schemas; the C++ ops stay absent, the pure-Python transforms (all HF image processors need) work.
"""

import importlib.abc
import sys

_libraries = []  # the torch.library handles must outlive the import


class _DefineTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            torch.ops.torchvision.nms
        except (AttributeError, RuntimeError):
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _libraries.append(library)
        return None  # the normal finders import torchvision


sys.meta_path.insert(0, _DefineTorchvisionSchemas())
