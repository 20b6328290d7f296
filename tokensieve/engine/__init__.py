"""The engine: what runs a method's stages on a stock model. Each file is one step of a forward:

- ``run.py``: ``apply`` / ``attach`` / ``observe`` and the :class:`Run` that installs the hooks and calls the steps;
- ``find_tokens.py``: which images a forward carries and where their tokens sit (beams and return sequences too);
- ``llm_signals.py``: the signals computed inside the LLM: each row's query token, the instruction's
  ``text_embeddings``, the query's ``llm_attention`` row (vision-side signals come from the adapters);
- ``select.py``: run a stage's sieve on each image and record what it kept (before the LLM: in_vision groups,
  then the pre-LLM sieve);
- ``vision_stage.py``: the ``in_vision`` stage, merging tokens between vision-tower layers;
- ``schedule.py`` and ``layer_stages.py``: the ``in_llm`` stages, each before one decoder layer: their schedule and
  its checks, then the hooks that run them;
- ``frames_stage.py``: the ``frames`` stage, the vision tower run on a video's kept frames only;
- ``decode_stage.py``: decode-time rules of in-LLM methods (MustDrop's cache eviction after the prefill, DyCoke's
  per-step choice of the video tokens a new token attends to);
- ``pack.py``: apply the selections and pack each row's kept tokens (shared by every stage);
- ``masks.py`` and ``cache.py``: remap the decoder's mask onto what each stage sees, and follow what a pruned
  KV cache holds across decode steps and turns;
- ``static_cache.py``: static caches, and compiled forwards (refused);
- ``flops.py`` and ``vision_flops.py``: the FLOPs a run records (decoder prefill; vision tower and projector);
- ``compat.py``: what differs between the supported transformers releases.
"""

from .run import OBSERVER, Run, apply, attach, observe

__all__ = ["OBSERVER", "Run", "apply", "attach", "observe"]
