"""Per-skill accuracy of the assembled sieve-mini on a QA split, through the stock LLaVA generate path.

    python -m tokensieve.mini.evaluate --split test --examples 700
    python -m tokensieve.mini.evaluate --split test --examples 700 --method random --keep 0.1
"""

from __future__ import annotations

import contextlib
import time

import torch
import typer

from ..cli import build_sieve, check_image_size, check_keep_has_method, parse_keep
from ..engine import apply
from ..qa import SPLIT_SEEDS, accuracy_by_skill, examples, format_table, is_correct
from .build import load_sieve_mini


@torch.inference_mode()
def evaluate_split(model, processor, split: str, count: int, sieve=None, batch: int = 8, image_size: int = 224,
                   progress: bool = True) -> dict:
    """Answer each example's own question (one per example, skills balanced) and score per skill, pruned by
    `sieve` when one is given."""
    records, clock = [], time.time()
    exs = examples(split, count)
    for start in range(0, count, batch):
        chunk = exs[start:start + batch]
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.qas[0].question}]}],
            add_generation_prompt=True) for ex in chunk]
        inputs = processor(images=[ex.image(image_size) for ex in chunk], text=prompts, return_tensors="pt",
                           padding=True)
        with contextlib.nullcontext() if sieve is None else apply(model, sieve):
            output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answers = processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        records += [(ex.skill, is_correct(a, ex.qas[0].answer)) for ex, a in zip(chunk, answers)]
        if progress:
            done = start + len(chunk)
            print(f"{done}/{count} examples, {sum(c for _, c in records) / len(records):.3f} correct, "
                  f"{(time.time() - clock) / done:.2f} s/example", flush=True)
    return accuracy_by_skill(records)


def main(split: str = typer.Option("validation"), examples_: int = typer.Option(210, "--examples", min=1),
         method: str = typer.Option(None, help="a tokensieve method or chain (fastervlm:128+fastv:0.5); none: all tokens"),
         keep: str = typer.Option(None, help="token count (64) or ratio (0.1; 1.0 keeps all) for --method"),
         image_size: int = typer.Option(224), batch: int = typer.Option(8, min=1)):
    # Every option is checked before the model loads, as `tokensieve run` does.
    if split not in SPLIT_SEEDS:
        raise typer.BadParameter(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}", param_hint="--split")
    keep_value = parse_keep(keep)
    check_keep_has_method(method, keep_value)
    check_image_size(image_size)
    sieve = build_sieve(method, keep_value)
    model, processor = load_sieve_mini(image_size)
    table = evaluate_split(model, processor, split, examples_, sieve, batch, image_size)
    label = f"{method} keep={keep}" if method else "all tokens"
    print(f"\n{split}, {examples_} examples, {label}:\n{format_table(table)}")


if __name__ == "__main__":
    typer.run(main)
