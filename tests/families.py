"""Every model family the contract tests run on: one tiny model each (see tiny_*.py). A video-capable family
runs again with videos as its inputs (``*_video``: the same model, one video where the images were)."""

from tiny_gemma3 import GEMMA3, GEMMA3_FRAMES
from tiny_gemma4 import GEMMA4
from tiny_idefics3 import IDEFICS3, SMOLVLM
from tiny_internvl import INTERNVL
from tiny_llava_next import LLAVA_NEXT, LLAVA_ONEVISION
from tiny_llava_frames import LLAVA_FRAMES
from tiny_llava_onevision_video import LLAVA_ONEVISION_VIDEO
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_5_VL, QWEN2_5_VL_VIDEO, QWEN2_VL, QWEN2_VL_VIDEO
from tiny_qwen3_vl import QWEN3_5, QWEN3_5_VIDEO, QWEN3_VL, QWEN3_VL_VIDEO

FAMILIES = [
    LLAVA,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    IDEFICS3,
    SMOLVLM,
    INTERNVL,
    QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL,
    QWEN3_5,
    GEMMA3,
    GEMMA4,
    QWEN2_VL_VIDEO,
    QWEN2_5_VL_VIDEO,
    LLAVA_ONEVISION_VIDEO,
    QWEN3_VL_VIDEO,
    QWEN3_5_VIDEO,
]

#: the families the shared contract (test_contract.py) runs on: every family, and those whose inputs need keywords of
#: ts.apply (``Family.options``: LLaVA and Gemma3 given videos as their frames, ``video_frames=``), which other files' loops over
#: FAMILIES do not pass
CONTRACT_FAMILIES = FAMILIES + [LLAVA_FRAMES, GEMMA3_FRAMES]
