"""Draw the example images shipped in examples/images/ (made here, so free to ship).

    python examples/make_images.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent / "images"


def sunset(size: int = 256) -> Image.Image:
    """A sun setting over the sea: warm gradient sky, dark water, a reflection."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    horizon = int(size * 0.62)
    for y in range(horizon):
        t = y / horizon
        draw.line([(0, y), (size, y)], fill=(int(60 + 190 * t), int(40 + 110 * t), int(120 - 60 * t)))
    for y in range(horizon, size):
        t = (y - horizon) / (size - horizon)
        draw.line([(0, y), (size, y)], fill=(int(30 - 20 * t), int(50 - 30 * t), int(90 - 40 * t)))
    sun = size // 2, int(size * 0.52), size // 7
    draw.ellipse([sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2]], fill=(255, 210, 120))
    for i, y in enumerate(range(horizon + 4, size, 9)):
        half = max(4, sun[2] - 3 * i)
        draw.line([(size // 2 - half, y), (size // 2 + half, y)], fill=(240, 170, 90), width=2)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def still_life(size: int = 256) -> Image.Image:
    """Three fruits on a table against a plain wall: simple shapes with clear colours."""
    image = Image.new("RGB", (size, size), (225, 215, 195))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(size * 0.65), size, size], fill=(120, 80, 50))
    for (cx, cy, r, colour) in [(70, 150, 34, (200, 30, 40)), (135, 160, 28, (240, 170, 20)),
                                (190, 148, 36, (90, 160, 50))]:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - r // 2, cy - r // 2, cx - r // 5, cy - r // 5], fill=tuple(min(255, c + 60) for c in colour))
    return image.filter(ImageFilter.GaussianBlur(0.6))


#: Pictures of the toy world (drawn by imageprompt_widgets/toy/world.py at its 64 px): what the ``toy`` presets
#: know, so their image-prompt routes visibly follow them (a real photograph becomes one of the world's scenes).
WORLD_PICTURES = {
    "red_circle_on_blue.png": ("circle", "red", "blue", 12, 10, 40),
    "yellow_triangle_on_black.png": ("triangle", "yellow", "black", 14, 16, 36),
    "green_square_on_white.png": ("square", "green", "white", 18, 14, 30),
}


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    sunset().save(HERE / "sunset.png", optimize=True)
    still_life().save(HERE / "still_life.png", optimize=True)
    from imageprompt_widgets.toy.world import Scene

    for name, (shape, colour, background, x, y, size) in WORLD_PICTURES.items():
        Scene(shape, colour, background, x, y, size).draw().save(HERE / name, optimize=True)
    print(f"wrote {', '.join(['sunset.png', 'still_life.png', *WORLD_PICTURES])} to {HERE}")


if __name__ == "__main__":
    main()
