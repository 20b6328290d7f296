"""The one list that drives the contract tests, read from the registry: every registered method, with the
arguments it is tested with, plus the chains.

Adding a method needs no line here (docs/methods.md has the checklist). A name "a+b" is a chain
(conftest.method_for); kwargs go to its last method.
"""

import tokensieve as ts

#: in-LLM methods prune after layer 1: the tiny models have two decoder layers
TINY_MODEL_ARGS = {"in_llm": {"layer": 1}}
#: a chain: its first method keeps half, the last one the budget
CHAINS = [("uniform+fastv", {"layer": 1})]

METHOD_CASES = [(info.name, TINY_MODEL_ARGS.get(info.stage, {})) for info in ts.list_methods()] + CHAINS
