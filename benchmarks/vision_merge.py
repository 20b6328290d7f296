"""ToMe inside the vision tower (``tome_vit``): tower time against the stock tower, and end-to-end time to the
first token against pruning before the LLM, whose gain the full tower run caps.

1. Tower: the vision tower alone (``get_image_features``: tower and projector) on the demo LLaVA (CLIP-shaped)
   and on sieve-mini (DINOv2 ViT-S/14), stock against ``tome_vit`` merging ``r`` = 8 and 16 tokens per layer.
2. End to end on sieve-mini at 448 px (1,024 visual tokens): ``generate()`` of one token (time to first token),
   stock against divprune and tome_vit at the same budget.

Runs alternate between configurations (ratios are medians of per-round ratios against the stock run of the
same round, so drift on a shared machine cancels).

    python benchmarks/vision_merge.py
    python benchmarks/vision_merge.py --keep 64 --repeats 9
"""

from __future__ import annotations

import statistics

import torch
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from shapes import model_and_inputs, paired_ratios, timed
from tokensieve.mini import SAMPLE_IMAGE, load_sieve_mini

console = Console()


def _interleaved(configs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each configuration's callable, ``repeats`` rounds, configurations alternating within a round."""
    for run in configs.values():
        run()  # warm-up
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, run in configs.items():
            times[name].append(timed(run, "cpu"))
    return times


def _table(title: str, times: dict[str, list[float]], tokens: dict[str, str]) -> Table:
    table = Table(title=title)
    for column in ("config", "tokens", "ms (median)", "speed-up vs stock (95% interval)"):
        table.add_column(column, justify="right")
    stock = times["stock"]
    for name, seconds in times.items():
        ratio, low, high = paired_ratios(stock, seconds)
        table.add_row(name, tokens[name], f"{statistics.median(seconds) * 1e3:.1f}", f"{ratio:.2f}x ({low:.2f}-{high:.2f})")
    return table


def _with(model, method, call):
    def run():
        if method is None:
            return call()
        with ts.apply(model, method):
            return call()
    return run


def _tower_configs(model, pixels, rs: list[int]):
    features = lambda: model.model.get_image_features(pixel_values=pixels)  # noqa: E731
    configs = {"stock": _with(model, None, features)}
    tokens = {"stock": "all"}
    for r in rs:
        method = ts.ToMeViT(keep=1, r=r)
        with ts.apply(model, method) as run:
            model(**_prompt(model, pixels))
        configs[f"tome_vit r={r}"] = _with(model, method, features)
        tokens[f"tome_vit r={r}"] = str(run.stats.images[0].after)
    return configs, tokens


def _prompt(model, pixels) -> dict:
    """One image's placeholders and a few text tokens, for a forward that records what the merges left."""
    patch = model.config.vision_config.patch_size
    n = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    ids = torch.cat([torch.tensor([[1, 2]]), torch.full((1, n), model.config.image_token_id), torch.tensor([[3, 4]])], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def main(
    keep: int = typer.Option(64, help="the end-to-end budget, of 1,024 tokens"),
    rs: str = typer.Option("8,16", help="tokens merged per tower layer"),
    repeats: int = typer.Option(9),
) -> None:
    torch.set_grad_enabled(False)
    r_values = [int(r) for r in rs.split(",")]
    demo, inputs = model_and_inputs("demo", "cpu", "float32")
    configs, tokens = _tower_configs(demo, inputs["pixel_values"], r_values)
    console.print(_table("demo LLaVA tower (CLIP 6x256 at 336 px, 576 patches) and projector", _interleaved(configs, repeats), tokens))

    model, processor = load_sieve_mini(image_size=448)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the triangle?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    mini_inputs = processor(images=Image.open(SAMPLE_IMAGE), text=prompt, return_tensors="pt")
    configs, tokens = _tower_configs(model, mini_inputs["pixel_values"], r_values)
    console.print(_table("sieve-mini tower (DINOv2 ViT-S/14 at 448 px, 1,024 patches) and projector",
                         _interleaved(configs, repeats), tokens))

    first_token = lambda: model.generate(**mini_inputs, max_new_tokens=1, do_sample=False)  # noqa: E731
    methods = {"stock": None, f"divprune {keep}": ts.DivPrune(keep=keep), f"uniform {keep}": ts.Uniform(keep=keep),
               f"tome_vit {keep}": ts.ToMeViT(keep=keep)}
    end_to_end = {name: _with(model, method, first_token) for name, method in methods.items()}
    counts = {name: str(keep) if method is not None else "1024" for name, method in methods.items()}
    console.print(_table(f"sieve-mini at 448 px, time to the first token (prompt {mini_inputs['input_ids'].shape[1]} tokens)",
                         _interleaved(end_to_end, repeats), counts))


if __name__ == "__main__":
    typer.run(main)
