import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cases import METHOD_CASES  # noqa: E402
from families import FAMILIES  # noqa: E402

import tokensieve as ts  # noqa: E402
from tokensieve.adapters import adapter_for  # noqa: E402
from tokensieve.signals import requests_of  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_MODELS = {}


def build_model(family):
    """One tiny model per family per session (tests must leave it as they found it)."""
    if family.name not in _MODELS:
        model = family.build()
        # transformers installs its output-capturing hooks on a model's first forward: run one now, so
        # that a test comparing the model before and after a method starts from the settled model.
        with torch.no_grad():
            model(**family.make_inputs([[5, 6]]))
        _MODELS[family.name] = model
    return _MODELS[family.name]


def method_for(name, kwargs, keep=16, pre_keep=0.5):
    """The method a case names; a chain "a+b+..." gives every method but its last ``pre_keep`` and its last
    ``keep`` and ``kwargs``; "name:option=value" is one method with those options (tests/cases.py OPTIONS)."""
    if "+" not in name:
        return ts.build(name, keep=keep, **kwargs) if ":" in name else ts.load(name, keep=keep, **kwargs)
    *early, last = name.split("+")
    return ts.Chain(*(ts.build(spec, keep=pre_keep) for spec in early), ts.build(last, keep=keep, **kwargs))


def pre_llm_sieve(method):
    sieves = method.sieves if isinstance(method, ts.Chain) else (method,)
    return next((s for s in sieves if s.stage == "pre_llm"), None)


def freezes(name, kwargs) -> bool:
    """Whether the case's method freezes tokens (skip_visual): they leave the hidden states but stay keys and values."""
    method = method_for(name, kwargs)
    return any(sieve.freezes for sieve in (method.sieves if isinstance(method, ts.Chain) else (method,)))


def supported(family, name, kwargs) -> bool:
    """Whether the family gives every signal the case's in_vision and pre-LLM methods ask for, runs in-LLM stages if
    the case has any, or a method acting at decode steps (Gemma3 refuses them), lets them prune where they do (Qwen3-VL: after its DeepStack layers;
    Qwen3.5: nowhere), and has videos if a method acts on videos only; videos given as images (``video_frames=``) take
    no in_vision stage."""
    method = method_for(name, kwargs)
    sieves = method.sieves if isinstance(method, ts.Chain) else (method,)
    model = build_model(family)
    adapter = adapter_for(model)
    if any(s.needs_video for s in sieves) and not family.videos:
        return False
    if family.options.get("video_frames") and any(s.stage == "in_vision" for s in sieves):
        return False  # the tower encodes each frame of a video given as images on its own
    if any(s.stage == "in_llm" or s.decode_rule(4) is not None for s in sieves) and not serves_in_llm(family):
        return False
    depth = model.config.get_text_config().num_hidden_layers
    layers = [stage.layer for s in sieves if s.stage == "in_llm" for stage in s.schedule(depth)]
    return not any(adapter.missing_signals(requests_of(s, adapter)) for s in sieves if s.stage in ("in_vision", "pre_llm")) \
        and not any(adapter.stage_layer_problem(layer) for layer in layers)


def serves_in_llm(family) -> bool:
    """Whether the family runs in-LLM stages from decoder layer 1 on (Gemma3 and Qwen3.5 refuse them: their adapters'
    ``in_llm_problem``)."""
    adapter = adapter_for(build_model(family))
    return adapter.in_llm_problem() is None and adapter.stage_layer_problem(1) is None


def family_method_params(want_supported: bool = True,
                         stages=("frames", "in_vision", "pre_llm", "in_llm", "chain", "vision_chain"), families=FAMILIES):
    """(family, method, kwargs) for every pair the family supports (or, with False, refuses), for cases
    of the given stages ("chain" for chains, "vision_chain" for chains that merge inside the vision tower)."""
    return [
        pytest.param(family, name, kwargs, id=f"{family.name}-{name}")
        for family in families
        for name, kwargs in METHOD_CASES
        if supported(family, name, kwargs) == want_supported and _stage(name, kwargs) in stages
    ]


def _stage(name, kwargs) -> str:
    method = method_for(name, kwargs)
    if isinstance(method, ts.Chain):
        return "vision_chain" if method.vision is not None else "chain"
    return method.stage
