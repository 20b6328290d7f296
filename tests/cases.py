"""The one list that drives the contract tests: every method, with the arguments it is tested with.

Adding a method: its file under tokensieve/methods/, an import in tokensieve/methods/__init__.py
(which registers it), a line here, and a row in docs/methods.md.
"""

METHOD_CASES = [
    ("random", {"seed": 0}),
    ("uniform", {}),
    ("pool", {}),
    ("fastervlm", {}),
    ("visionzip", {}),
    ("divprune", {}),
]
