"""The one list that drives the contract tests: every method, with the arguments it is tested with.

Adding a method: its file under tokensieve/methods/, an import in tokensieve/methods/__init__.py
(which registers it), a line here, and a row in docs/methods.md. A name "a+b" is a chain
(conftest.method_for); kwargs go to its last method.
"""

METHOD_CASES = [
    ("random", {"seed": 0}),
    ("uniform", {}),
    ("pool", {}),
    ("fastervlm", {}),
    ("visionzip", {}),
    ("divprune", {}),
    ("fastv", {"layer": 1}),  # the tiny models have two decoder layers
    ("uniform+fastv", {"layer": 1}),  # a chain: its first method keeps half, the last one the budget
]
