"""tokensieve: visual token reduction for stock Hugging Face vision-language models."""

from .budget import Budget, BudgetClampedWarning
from .chain import Chain
from .engine import Run, apply, attach
from .methods import DivPrune, FasterVLM, FastV, Pool, RandomPrune, Uniform, VisionZip
from .registry import MethodInfo, build, list_methods, load, register
from .sieve import ScoringSieve, Selection, Sieve, VisualTokens

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetClampedWarning", "Chain", "DivPrune", "FasterVLM", "FastV", "MethodInfo", "Pool", "RandomPrune", "Run",
    "ScoringSieve", "Selection", "Sieve", "Uniform", "VisionZip", "VisualTokens", "apply", "attach", "build",
    "list_methods", "load", "register",
]
