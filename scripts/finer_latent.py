"""Does a finer latent make the toy UNet's word maps show where? (issue 24's remedy, as an experiment)

    nice python scripts/finer_latent.py --out /tmp/finer --factor 4      # 16 x 16 latent: VAE and UNet retrained
    nice python scripts/finer_latent.py --out /tmp/finer --factor 8      # the control: the shipped VAE, 8 x 8

Trains a text-to-image base on the shipped toy CLIP (its text tower, frozen, as the shipped base reads it): with
``--factor 4`` a VAE that downsamples 4x (three blocks instead of four) and a UNet on its 16 x 16 latent; with
``--factor 8`` only a UNet, on the shipped VAE. Both with the same reduced budget (``--unet-steps`` x
``--unet-batch``, by default a quarter of the shipped base's pictures), so the two differ only in the latent.
Then it measures what docs/toy_world.md reports: the word maps' mIoU beside the centred disc, the latent grid's
ceiling and the maps' contrast (toy/localise.py), and text-to-image on the 48 held-out captions.

Nothing here is shipped: the base the presets load stays ``imageprompt_widgets/toy/weights/sd``. Seeded and
single-threaded like ``scripts/train_toy.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the trained base goes (an SD folder, 'sd')")
    parser.add_argument("--factor", type=int, choices=(4, 8), default=4, help="the VAE's downsampling (8: shipped)")
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from imageprompt_widgets.engine.pipeline import ImagePromptPipeline
    from imageprompt_widgets.toy import CLIP_FOLDER, WEIGHTS, localise, measure, train, world

    budget = dataclasses.replace(train.Budget(), unet_steps=args.unet_steps, unet_batch=args.unet_batch)
    _, text_encoder, tokenizer, shipped_vae, _ = train.load_base(WEIGHTS)
    start = time.perf_counter()
    if args.factor == 4:
        train.VAE_CONFIG.update(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                up_block_types=("UpDecoderBlock2D",) * 3)
        train.UNET_CONFIG.update(sample_size=world.IMAGE_SIZE // 4)
        vae = train.train_vae(budget, args.seed, print)
    else:
        vae = shipped_vae
    unet = train.train_unet(text_encoder, tokenizer, vae, budget, args.seed, print)
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
