"""Reading values back to the host stalls a GPU until its queue drains: the engine's reads must not
grow with the number of images in a call (each was once read back per image, or per batch row)."""

import pytest

import tokensieve as ts
from conftest import build_model, method_for
from tiny_models import LLAVA
from tokensieve.bench.measure import HostReads


def host_reads(model, inputs, method) -> int:
    with ts.apply(model, method):
        with HostReads() as counter:
            model(**inputs)
    return counter.count


@pytest.mark.parametrize("name, kwargs", [("uniform", {}), ("fastervlm", {}), ("visionzip", {}), ("divprune", {}), ("fastv", {"layer": 1}),
                                          ("uniform+fastv", {"layer": 1})])  # the tiny decoder has two layers
def test_host_reads_do_not_grow_with_the_images_in_a_call(name, kwargs):
    model = build_model(LLAVA)
    two = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]])
    six = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10], [11, 12, 13], [5, 9], [6, 7, 8, 9, 10], [12]])
    assert host_reads(model, six, method_for(name, kwargs)) == host_reads(model, two, method_for(name, kwargs)) > 0
