"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and its MoE ``Qwen3VLMoeForConditionalGeneration``) and Qwen3.5
(``Qwen3_5ForConditionalGeneration``).

Both keep Qwen2-VL's layout (see qwen2_vl.py): the processor orders each image's patches by 2x2 merge block,
the merger turns each block into one LLM token (LLM token i comes from the tower's patch rows 4i..4i+3, so
``vision_features`` is the merger's input with those rows concatenated, in raster order: the towers have no
windows), the LLM sees 4-row positions (a text row, then mrope's t, h, w) built from ``input_ids``,
``mm_token_type_ids`` and ``image_grid_thw``, and kept tokens keep theirs. The engine always hands the decoder
an explicit 2D mask: with none, no cache (``use_cache=False``) and a text row with gaps, transformers would read
the pruned sequence as several packed ones, silently.

**DeepStack (Qwen3-VL).** The tower also projects the patch states of a few of its blocks
(``deepstack_visual_indexes``), one set of rows per listed block, each aligned with the image tokens; the text
model adds set j to the image positions (``visual_pos_masks``) after decoder layer j. So the decoder's
``visual_pos_masks`` and ``deepstack_visual_embeds`` are packed with the image tokens (``pack_token_inputs``):
each kept token keeps its own rows, and a merge map's group means apply to them as to the features (a method
that writes its own features, pooling say, leaves each kept token its own DeepStack rows). Unpacked rows would
fail loudly in the text model, wrong ones silently. The text model adds them from a local mask no layer hook
sees, so in-LLM stages prune only after the last injection layer (``stage_layer_problem``).

**Qwen3.5.** The same tower without DeepStack and a hybrid text model: three Gated DeltaNet (linear attention)
layers for every full-attention one. A linear layer's recurrence reads a masked token as a zero input that still
advances its state, so pruning cannot equal the unpruned sequence with the dropped tokens masked out; what it
equals is the language model run on the kept tokens alone, at their original positions (tests/test_adapter_qwen3_vl.py
checks that reference). In-LLM stages, and decode-step rules (dycoke's ``kv_keep``), are refused (``in_llm_problem``): a
linear layer's state has already absorbed every token, and it has no attention to mask.

**Videos.** The processor writes each temporal patch (frame pair) of a video as its own little image with a timestamp
before it: ``<t seconds>`` text tokens, ``vision_start``, the frame's ``video_pad`` tokens, ``vision_end``
(``Qwen3VLProcessor.replace_video_token``), and ``get_rope_index`` splits ``video_grid_thw`` into one (1, h, w) grid per
frame (no temporal mrope axis: every frame starts its t, h, w positions where the text before it ends). A video is
still one slot, as on Qwen2-VL: ``frames = (t, h/2, w/2)``, one block per frame, its positions the video_pad tokens
in order across frames; the timestamp and vision start/end tokens between frames are text and always stay. The
seconds reach the model only as those text tokens (no ``second_per_grid_ts``), so the slots' ``timestamps`` are None.
The tower attends within each frame, as Qwen2-VL's does, so a ``frames`` stage runs it on the kept frames only; its
DeepStack rows are spread back over every frame with the merger's output (``full_frames``).
"""

from __future__ import annotations

import torch
from torch import nn

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_name = "Qwen3-VL"
    model_classes = (
        "Qwen3VLForConditionalGeneration", "Qwen3VLModel", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel",
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        #: the text model adds DeepStack set j after decoder layer j, for j below this
        self.deepstack_layers = len(getattr(self.vision_config, "deepstack_visual_indexes", None) or ())

    def stage_layer_problem(self, layer: int) -> str | None:
        last = self.deepstack_layers - 1
        if layer > last:
            return None
        return (f"{self.model_name} adds its DeepStack features to every image position after decoder layers 0 to {last} "
                f"(from a mask no layer hook can reach), so a stage before layer {last + 1} would drop tokens they are "
                f"added to: pass layer={last + 1} or later")

    def full_frames(self, output, grid: torch.Tensor, kept: list[torch.Tensor]):
        """Qwen2-VL's (the merger's output over every frame, zeros at the dropped ones), and each DeepStack set alike:
        the model splits and scatters them by the full grid."""
        levels = getattr(output, "deepstack_features", None)  # Qwen3.5's tower has none
        if levels:
            output.deepstack_features = [self._over_every_frame(rows, grid, kept) for rows in levels]
        return super().full_frames(output, grid, kept)

    def pack_token_inputs(self, kwargs: dict, pack) -> dict:
        where, levels = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if where is None or not levels:
            return {}
        rows = torch.stack(list(levels), dim=1)  # (visual tokens in row-major order over `where`, levels, d)
        dense = rows.new_zeros(*where.shape, *rows.shape[1:])
        dense[where.to(rows.device)] = rows
        packed_where = pack(where)
        packed = pack(dense)[packed_where.to(rows.device)]
        return {"visual_pos_masks": packed_where, "deepstack_visual_embeds": list(packed.unbind(1))}


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_name = "Qwen3.5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")

    def in_llm_problem(self) -> str | None:
        # also what refuses a pre-LLM method's decode-step rule (dycoke's kv_keep), which no layer's check sees
        return (f"{self.model_name}'s linear-attention layers carry a recurrent state that has already absorbed every "
                f"token by then (pruning would save no cache there, and its full-attention layers would need per-layer "
                f"decode masks)")
