"""Per-skill accuracy of the assembled sieve-mini on a QA split, through the stock LLaVA generate path.

    python -m tokensieve.mini.evaluate --split test --examples 700
    python -m tokensieve.mini.evaluate --split test --examples 700 --method random --keep 0.1
"""

from __future__ import annotations

import contextlib
import time

import torch
import typer

from ..qa import SPLIT_SEEDS, accuracy_by_skill, examples, format_table, is_correct
from .build import load_sieve_mini
from .cli import parse_keep


@torch.inference_mode()
def evaluate_split(model, processor, split: str, count: int, method: str | None = None, keep=None,
                   batch: int = 8, image_size: int = 224, progress: bool = True) -> dict:
    """Answer each example's own question (one per example, skills balanced) and score per skill."""
    if split not in SPLIT_SEEDS:
        raise typer.BadParameter(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    sieve = None
    if method is not None:
        import tokensieve as ts

        sieve = ts.build(method, keep=keep)
    records, clock = [], time.time()
    exs = examples(split, count)
    for start in range(0, count, batch):
        chunk = exs[start:start + batch]
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.qas[0].question}]}],
            add_generation_prompt=True) for ex in chunk]
        inputs = processor(images=[ex.image(image_size) for ex in chunk], text=prompts, return_tensors="pt",
                           padding=True)
        if sieve is not None:
            import tokensieve as ts

            context = ts.apply(model, sieve)
        else:
            context = contextlib.nullcontext()
        with context:
            output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answers = processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        records += [(ex.skill, is_correct(a, ex.qas[0].answer)) for ex, a in zip(chunk, answers)]
        if progress:
            done = start + len(chunk)
            print(f"{done}/{count} examples, {sum(c for _, c in records) / len(records):.3f} correct, "
                  f"{(time.time() - clock) / done:.2f} s/example", flush=True)
    return accuracy_by_skill(records)


def main(split: str = typer.Option("validation"), examples_: int = typer.Option(210, "--examples"),
         method: str = typer.Option(None, help="a tokensieve method or chain (fastervlm:128+fastv:0.5); none: all tokens"),
         keep: str = typer.Option(None, help="token count (64) or ratio (0.1) for --method"),
         image_size: int = typer.Option(224), batch: int = typer.Option(8)):
    model, processor = load_sieve_mini(image_size)
    table = evaluate_split(model, processor, split, examples_, method, parse_keep(keep), batch, image_size)
    label = f"{method} keep={keep}" if method else "all tokens"
    print(f"\n{split}, {examples_} examples, {label}:\n{format_table(table)}")


if __name__ == "__main__":
    typer.run(main)
