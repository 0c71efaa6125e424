"""The hard-prompt search (``mode="words", words="search"``) at real size: CLIP ViT-L/14's text tower with its
projection (SD 1.x's text encoder), random weights (the time depends on shapes, not values), 8 tokens, the default
steps, one torch thread. Built in memory from realsize.TEXT_CONFIG: no 6 GB build needed.

    python -m benchmarks.words_search [--steps N] [--tokens N]
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from benchmarks.realsize import REALSIZE_SEED, TEXT_CONFIG, _uninitialised_modules, fill_random
    from imageprompt_widgets.methods.words import search_tokens
    from imageprompt_widgets.settings import GenerationSettings

    defaults = GenerationSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.words_steps)
    parser.add_argument("--tokens", type=int, default=defaults.words_tokens)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = CLIPTextConfig(**TEXT_CONFIG, bos_token_id=TEXT_CONFIG["vocab_size"] - 2,
                            eos_token_id=TEXT_CONFIG["vocab_size"] - 1, pad_token_id=TEXT_CONFIG["vocab_size"] - 1)
    with _uninitialised_modules():
        model = CLIPTextModelWithProjection(config)
    fill_random(model, REALSIZE_SEED)
    model.eval()
    target = torch.nn.functional.normalize(torch.randn(config.projection_dim, generator=torch.Generator().manual_seed(0)),
                                           dim=0)
    start = time.perf_counter()
    # The search projects onto all 49,408 rows of the token embedding, as with openai's tokenizer; only the
    # special ids matter to it (the decoding into text, which it does not time, needs the real tokenizer).
    special = {config.bos_token_id, config.eos_token_id, config.pad_token_id}
    _, cosines, best_step = search_tokens(model, target, tokens=args.tokens, steps=args.steps, seed=0,
                                            special_ids=special, bos_id=config.bos_token_id,
                                            eos_id=config.eos_token_id)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"search: {args.tokens} tokens, {args.steps} steps on a {params:.0f} M-parameter text tower "
          f"(vocabulary {config.vocab_size}), one thread: {seconds:.1f} s ({seconds / args.steps * 1000:.0f} ms a step); "
          f"best cosine {max(cosines):.3f} at step {best_step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
