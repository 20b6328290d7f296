"""lmms-eval's model ``tokensieve``: any lmms-eval model with a tokensieve method applied.

    python -m lmms_eval --model tokensieve --tasks mme --batch_size 1 \\
        --model_args model=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,device_map=cuda:0,method=fastervlm,keep=64

``model`` names the lmms-eval model that loads and prompts the checkpoint (default ``llava_hf``);
``method`` and ``keep`` pick the tokensieve method, ``method_<name>=value`` passes its other
options (``method_seed=1``) and ``ppe=8`` applies it with Positional Preservation Embedding (merged tokens keep
8 of their members' positions); every other argument goes to that model unchanged. ``method=none``
applies nothing: the wrapped model runs untouched under ``ts.observe``, and ``run_stats`` records
its tokens, FLOPs and KV-cache bytes as a method's run does (the baseline of the same task).
``pretrained=sieve-mini`` means tokensieve's embedded model. lmms-eval finds this class through
the ``lmms_eval.models`` entry point in tokensieve's pyproject.toml (see docs/lmms-eval.md).
"""

from __future__ import annotations

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from transformers import PreTrainedModel

import tokensieve as ts
from tokensieve.bench.lmms_eval_deps import check_lmms_eval_path

#: ``method=`` values that apply no method: the stock model, observed
NO_METHOD = ("none", "")

#: the entry point's payload: lmms-eval resolves ``tokensieve`` to the chat class unless it is run
#: with --force_simple, and the chosen class asks for the wrapped model of the same kind
MANIFEST = ModelManifest(
    model_id="tokensieve",
    simple_class_path=f"{__name__}.Tokensieve",
    chat_class_path=f"{__name__}.TokensieveChat",
)


class Tokensieve(lmms):
    """Wraps another lmms-eval model and applies the method around each of its request batches."""

    def __init__(self, model: str = "llava_hf", method: str = "fastervlm", keep: int | float | None = None,
                 ppe: int | None = None, **model_args) -> None:
        super().__init__()
        check_lmms_eval_path()  # a dependency that breaks lmms-eval's late imports fails now, naming its fix
        method_args = {name.removeprefix("method_"): model_args.pop(name)
                       for name in list(model_args) if name.startswith("method_")}
        # a bad method fails before a model is loaded; a chain ("fastervlm:128+fastv:0.5") takes no method_ args
        if str(method).strip().lower() in NO_METHOD:
            if keep is not None or method_args or ppe is not None:
                raise ValueError(f"method={method} applies no method, so it takes no keep=, ppe= or method_ arguments")
            self.sieve = None  # ts.apply without a method observes
        else:
            self.sieve = ts.build(method, keep=keep, **method_args)
        self.ppe = ppe
        if model_args.get("pretrained") == "sieve-mini":
            from tokensieve.mini.build import model_dir

            model_args["pretrained"] = str(model_dir())
        # Imported here: lmms_eval.models imports this module while it reads the entry points.
        from lmms_eval.models import get_model

        self.inner = get_model(model, force_simple=type(self).is_simple)(**model_args)
        self.is_simple = self.inner.is_simple  # tasks build their requests for the wrapped model's kind
        self.task_dict = self.inner.task_dict  # the evaluator fills this dict, the wrapped model reads it
        self.run_stats: list[ts.RunStats] = []  # one per request batch: what the method kept
        ts.attach(self.hf_model, self.sieve).remove()  # an unsupported family or signal fails now, not mid-run

    @property
    def hf_model(self) -> PreTrainedModel:
        hf_model = getattr(self.inner, "model", None)
        if not isinstance(hf_model, PreTrainedModel):
            raise TypeError(
                f"lmms-eval model {type(self.inner).__name__} exposes no transformers model as .model; "
                "tokensieve prunes transformers VLMs only (not API or vLLM backends)"
            )
        return hf_model

    def __getattr__(self, name: str):
        # Runs only for names this wrapper lacks: the evaluator's and tasks' questions (device,
        # accelerator, tokenizer, batch_size, ...) are the wrapped model's to answer.
        if name == "inner":  # not set yet: __init__ failed before it
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def set_cache_hook(self, cache_hook) -> None:
        self.inner.set_cache_hook(cache_hook)

    def clean(self) -> None:
        self.inner.clean()

    def generate_until(self, requests):
        return self._with_method("generate_until", requests)

    def generate_until_multi_round(self, requests):
        return self._with_method("generate_until_multi_round", requests)

    def loglikelihood(self, requests):
        if self.sieve is None:  # observed: the stock forward, whose logits line up with the labels
            return self._with_method("loglikelihood", requests)
        # A pruned forward returns logits for the kept tokens only, while the wrapped model scores
        # them against labels that cover every token: refuse rather than fail inside its loss.
        raise NotImplementedError(
            "tokensieve does not score loglikelihood (multiple_choice) requests yet: a pruned forward "
            "drops visual tokens the wrapped model's labels still count. Run generate_until tasks"
        )

    def _with_method(self, request_type: str, requests):
        with ts.apply(self.hf_model, self.sieve, ppe=self.ppe) as run:
            outputs = getattr(self.inner, request_type)(requests)
        self.run_stats.append(run.stats)
        logger.info(f"tokensieve {run.sieve.name}: {len(requests)} {request_type} requests; {run.stats.summary()}")
        return outputs


class TokensieveChat(Tokensieve):
    is_simple = False
