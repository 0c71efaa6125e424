"""Does a finer latent make the toy UNet's word maps show where, and does it still draw the named shape? (issue 24)

    nice python scripts/finer_latent.py --out /tmp/finer --set latent_factor=4                 # 16 x 16 latent
    nice python scripts/finer_latent.py --out /tmp/finer --set latent_factor=4 --set latent_std=0.5 \\
        --set unet_noisy_bias=2                                                             # and the noise moved
    nice python scripts/finer_latent.py --out /tmp/finer --set latent_factor=4 --unet two-level \\
        --set unet_steps=1500 --set unet_batch=32                                           # the first experiment
    nice python scripts/finer_latent.py --out /tmp/finer --set unet_steps=1500 --set unet_batch=32  # its control

Trains a text-to-image base (a VAE and a UNet) on the shipped toy CLIP's text tower, frozen, with the training
budget changed by ``--set`` (the fields of ``train.Budget``; ``latent_factor`` 4 is a VAE that downsamples 4x, a
16 x 16 latent), then measures what docs/toy_world.md reports: the word maps' mIoU beside the centred disc, the
latent grid's ceiling and the maps' contrast (toy/localise.py), and text-to-image on the 48 held-out captions.

``--unet`` picks the UNet: ``default`` is ``train.unet_config(latent_factor)``; ``two-level`` the 8 x 8 world's
two levels run at the latent's size (cross-attention at 16 x 16 and 8 x 8: what the first experiment trained);
``attention`` the default's three levels with cross-attention in the 16 x 16 level too (two heads there).

Nothing here is shipped: it writes only under ``--out``. Seeded and single-threaded like ``scripts/train_toy.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unet_variant(name: str, latent_factor: int) -> dict | None:
    """The UNet configuration ``--unet`` names (``None``: the default, ``train.unet_config``)."""
    from imageprompt_widgets.toy import train, world

    if name == "two-level":
        return {**train.unet_config(8), "sample_size": world.IMAGE_SIZE // latent_factor}
    if name == "attention":
        levels = len(train.unet_config(latent_factor)["block_out_channels"])
        return {**train.unet_config(latent_factor), "down_block_types": ("CrossAttnDownBlock2D",) * levels,
                "up_block_types": ("CrossAttnUpBlock2D",) * levels, "attention_head_dim": (2, 8, 8)[-levels:]}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the trained base goes (an SD folder, 'sd')")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the training budget")
    parser.add_argument("--unet", choices=("default", "two-level", "attention"), default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from imageprompt_widgets.engine.pipeline import ImagePromptPipeline
    from imageprompt_widgets.toy import CLIP_FOLDER, WEIGHTS, localise, measure, train, world

    budget = train.Budget()
    for change in args.set:
        name, _, value = change.partition("=")
        budget = dataclasses.replace(budget, **{name: type(getattr(budget, name))(value)})
    clip, tokenizer = train.load_clip(WEIGHTS)
    text_encoder = train.text_encoder_of(clip)
    start = time.perf_counter()
    vae = train.train_vae(budget, args.seed, print)
    config = unet_variant(args.unet, budget.latent_factor)
    unet = train.train_unet(text_encoder, tokenizer, vae, budget, args.seed, print, config=config)
    folder = args.out / "sd"
    train.save_sd(folder, vae, text_encoder, tokenizer, unet)
    print(f"trained in {time.perf_counter() - start:.0f} s: {folder}")

    pipe = ImagePromptPipeline.from_pretrained(str(folder), str(CLIP_FOLDER))
    sampling = {"steps": 20, "guidance_scale": 2.0, "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}
    print(localise.localisation_table([localise.word_map_localisation(pipe, **sampling)]))
    tally = measure.text_to_image(pipe, world.held_out_scenes(), **sampling).tally
    print(f"text-to-image on {tally.count} held-out captions: colour {100 * tally.rate('colour'):.0f} %, "
          f"shape {100 * tally.rate('shape'):.0f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
