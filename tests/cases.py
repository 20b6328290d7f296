"""The one list that drives the contract tests, read from the registry: every registered method, with the
arguments it is tested with, plus the chains.

Adding a method needs no line here (docs/methods.md has the checklist). A name "a+b+..." is a chain of
command-line spellings (conftest.method_for): every method but the last gets the case's early budget,
the last the case's budget and kwargs.
"""

import tokensieve as ts

#: in-LLM methods with one stage prune before layer 1 of the tiny models' four decoder layers; PyramidDrop
#: places its three stages by the depth (layers 1, 2, 3); HiPrune's object layer is the first of the tiny
#: towers' two or three vision layers; VTC-CLS sums the [CLS] rows of the layers from -3 to -2 (the [CLS] towers
#: have three); ToDRE's second stage drops an image only once its attention shares fall below tau: 1.0 always does
TINY_MODEL_ARGS = {"layer": 1, "object_layer": 1, "first_layer": -3, "tau": 1.0}
CHAINS = [
    ("uniform+fastv", {"layer": 1}),
    ("uniform+pyramiddrop", {}),  # one method before the LLM, three stages inside it
    ("fastv:layer=1+pyramiddrop", {"layers": (2, 3)}),  # two in-LLM methods, three stages
    ("tome_vit+divprune+fastv", {"layer": 1}),  # merged inside the vision tower, then pruned before and in the LLM
    ("uniform+csp", {"clusters": 8}),  # csp's scattering brings back what it received: the tokens kept before the LLM
    ("mustdrop+mustdrop_llm:decode=True", {}),  # MustDrop's three stages: merged before the LLM, filtered, evicted
]


def _tiny_arguments(info) -> dict:
    return {name: value for name, value in TINY_MODEL_ARGS.items() if name in info.defaults}


#: a method's other versions, spelled as ts.build spells them ("name:option=value")
OPTIONS = [
    ("sparsevlm:version=1", {}),  # the rank's adaptive count, four stages
    ("sparsevlm:version=2", {}),  # SparseVLM+: debiased rater rows, top heads, no recycling
    ("mustdrop_llm:decode=True", {}),  # the KV cache evicted after the prefill (decode_stage.py)
    ("dycoke:kv_keep=0.2", {}),  # the decode steps' image keys picked step by step (decode_stage.py)
]
METHOD_CASES = [(info.name, _tiny_arguments(info)) for info in ts.list_methods()] + OPTIONS + CHAINS
