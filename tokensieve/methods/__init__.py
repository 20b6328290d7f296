"""One file per method; importing this package registers them all."""

from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .pool import Pool
from .random_prune import RandomPrune
from .uniform import Uniform
from .visionzip import VisionZip

__all__ = ["DivPrune", "FasterVLM", "FastV", "Pool", "RandomPrune", "Uniform", "VisionZip"]
