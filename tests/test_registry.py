"""The registry is the one place a method is declared: loading, listing, exporting, the command-line
spelling and the contract's case list all follow from it."""

import dataclasses

import pytest

import tokensieve as ts
from cases import METHOD_CASES
from tokensieve.registry import register
from tokensieve.sieve import Sieve


def test_every_registered_method_has_a_contract_case_and_an_export():
    methods = ts.list_methods()
    assert {info.name for info in methods} <= {name for name, _ in METHOD_CASES}
    for info in methods:
        cls = getattr(ts, info.class_name)
        assert cls.name == info.name and info.class_name in ts.__all__ and info.class_name in dir(ts)
        assert type(ts.load(info.name)) is cls


def test_a_sieve_prints_and_lists_the_arguments_it_was_given():
    assert repr(ts.VisionZip(contextual=5)) == "VisionZip(keep=64, contextual=5)"
    assert repr(ts.FastV(keep=0.25, layer=3)) == "FastV(keep=0.25, layer=3)"
    assert ts.load("random", keep=8, seed=3).defaults() == {"keep": 8, "seed": 3}
    in_llm = {info.name: info for info in ts.list_methods(stage="in_llm")}
    assert in_llm["fastv"].defaults == {"keep": 0.5, "layer": 2}
    assert in_llm["pyramiddrop"].defaults == {"keep": 0.125, "layers": None, "positions": "original"}
    [divprune] = [info for info in ts.list_methods() if info.name == "divprune"]
    assert divprune.defaults == {"keep": 0.098}


def test_list_methods_filters_by_stage_and_signal():
    every = ts.list_methods()
    for needs in ["cls_attention", ("cls_attention", "vision_keys")]:
        wanted = {needs} if isinstance(needs, str) else set(needs)
        listed = [info.name for info in ts.list_methods(needs=needs)]
        assert listed == [info.name for info in every if wanted <= set(info.signals)]
    assert {"fastervlm", "visionzip", "vispruner", "vtc_cls"} <= {info.name for info in ts.list_methods(needs="cls_attention")}
    assert "visionzip" in [info.name for info in ts.list_methods(needs=("cls_attention", "vision_keys"))]
    assert "divprune" not in [info.name for info in ts.list_methods(needs="cls_attention")]
    assert {info.stage for info in ts.list_methods(stage="pre_llm")} == {"pre_llm"}
    with pytest.raises(ValueError, match="stage='vision': choose from frames, in_vision, pre_llm, in_llm"):
        ts.list_methods(stage="vision")


@pytest.mark.parametrize("spec, expected", [
    ("fastv", "FastV(keep=0.5, layer=2)"),
    ("fastv:0.25", "FastV(keep=0.25, layer=2)"),
    ("fastv:keep=0.25,layer=3", "FastV(keep=0.25, layer=3)"),
    ("fastv:0.25, layer=3", "FastV(keep=0.25, layer=3)"),
    ("visionzip:128,contextual=None", "VisionZip(keep=128, contextual=None)"),
    ("fastervlm:128+fastv:0.5,layer=3", "Chain(FasterVLM(keep=128), FastV(keep=0.5, layer=3))"),
])
def test_build_takes_every_argument_in_the_command_line_spelling(spec, expected):
    assert repr(ts.build(spec)) == expected


def test_build_errors_name_what_to_change():
    with pytest.raises(ValueError, match="fastv takes keep, layer; not layr"):
        ts.build("fastv:layr=3")
    with pytest.raises(ValueError, match="only the first value may stand alone"):
        ts.build("fastv:layer=3,0.5")
    with pytest.raises(ValueError, match="is a chain: give its methods' arguments in the spelling"):
        ts.build("uniform+fastv", seed=1)
    assert repr(ts.build("random", keep=8, seed=7)) == "RandomPrune(keep=8, seed=7)"


def test_a_list_of_specs_keeps_each_methods_arguments_with_it():
    assert ts.split_specs("divprune,fastv:0.5,layer=3,uniform:16") == ["divprune", "fastv:0.5,layer=3", "uniform:16"]


def test_register_refuses_what_would_not_work():
    class NotADataclass(Sieve):
        name, paper = "not_a_dataclass", "-"

    with pytest.raises(TypeError, match="must be a dataclass: decorate it @register above @dataclass"):
        register(NotADataclass)

    @dataclasses.dataclass
    class Duplicate(Sieve):
        name, paper = "uniform", "-"

    with pytest.raises(ValueError, match="a method named 'uniform' is already registered"):
        register(Duplicate)


def test_every_registered_method_is_listed_in_the_readme_and_has_a_catalogue_row():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    catalogue = (root / "docs" / "methods.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    names = [info.name for info in ts.list_methods()]
    assert f"{len(names)} training-free methods" in section
    assert [name for name in names if f"`{name}`" not in section] == []
    assert [name for name in names if f"\n| `{name}` |" not in catalogue] == []


@pytest.mark.parametrize("name, why, instead", [
    ("visionselector", "trained scorer", "idpruner"),
    ("pvc", "trained tower and projector", "per_crop=True"),
])
def test_a_method_left_out_on_purpose_is_refused_with_why_and_what_to_use(name, why, instead):
    for make in (lambda: ts.load(name), lambda: ts.build(f"{name}:64")):
        with pytest.raises(ValueError, match=f"^{name} is not served: ") as refused:
            make()
        assert why in str(refused.value) and instead in str(refused.value)
    assert name not in {info.name for info in ts.list_methods()}
