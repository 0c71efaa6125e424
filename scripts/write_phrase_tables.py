"""Write the phrase tables that ``pipe.nearest_words`` and ``mode="words"`` rank (imageprompt_widgets/methods/phrases/).

``general.txt``: subjects, colours, media, styles, lighting, composition and moods, alone and combined from the
small word lists below (a few thousand phrases, written here once so the package ships plain text). ``toy.txt``:
the toy world's own words: its captions and their parts (toy/world.py). Run it again after editing a list;
tests/test_words.py checks the shipped files equal what this script writes.

    python scripts/write_phrase_tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "imageprompt_widgets" / "methods" / "phrases"


def items(text: str) -> list[str]:
    """Comma-separated phrases written over several lines."""
    return [part.strip() for part in text.replace("\n", " ").split(",") if part.strip()]


def words(text: str) -> list[str]:
    return text.split()


SUBJECTS = words("""cat dog horse bird owl eagle fish shark whale dolphin butterfly bee spider snake lion tiger bear wolf fox
deer rabbit elephant giraffe monkey frog turtle dragon unicorn robot astronaut knight wizard witch soldier pirate
samurai princess king queen child baby girl boy woman man old man old woman couple family crowd portrait face eye hand
skull statue angel demon ghost alien monster zombie vampire mermaid fairy car truck bicycle motorcycle train airplane
helicopter ship sailboat rocket spaceship submarine tank house castle church temple tower lighthouse bridge skyscraper
city street village farm barn cottage cabin ruins palace library kitchen bedroom living room bathroom office classroom
restaurant cafe bar market shop factory garden park forest jungle desert mountain volcano canyon valley hill meadow
field river lake waterfall ocean beach island cave glacier iceberg sky cloud storm rainbow sunset sunrise moon sun
star galaxy planet nebula flower rose sunflower tulip tree oak tree palm tree cactus mushroom leaf fruit apple orange
banana strawberry cake bread pizza coffee cup teapot bottle wine glass vase chair table sofa bed lamp clock book
guitar piano violin drum computer phone camera television sword shield crown ring necklace hat shoe dress jacket""")
# Two-word subjects written with an underscore would need a parser; the list above keeps them as single words,
# and these are the multi-word ones.
SUBJECTS_MULTI = ["old man", "old woman", "living room", "oak tree", "palm tree", "wine glass", "city street",
                  "mountain lake", "night sky", "coral reef", "snowy mountain", "busy street", "empty road"]
COLOURS = words("""red orange yellow green blue purple pink brown black white grey gold silver teal turquoise cyan magenta
crimson scarlet maroon navy indigo violet lavender beige cream ivory olive emerald amber""")
MEDIA = items("""photograph, oil painting, watercolor painting, acrylic painting, pencil sketch, charcoal drawing, ink drawing,
digital painting, digital art, 3d render, concept art, illustration, comic book panel, manga drawing, anime still,
pixel art, vector art, low poly render, claymation, woodcut print, linocut, etching, engraving, lithograph,
screen print, mosaic, stained glass, tapestry, fresco, mural, graffiti, poster, album cover, book cover,
children's book illustration, botanical illustration, technical drawing, blueprint, infographic, collage,
papercut art, origami, sculpture, bronze sculpture, marble sculpture, ceramic figure, embroidery, polaroid photo,
film photograph, black and white photograph, infrared photograph, macro photograph, aerial photograph,
satellite image, x-ray image, microscope image, studio photograph, product photo, street photograph,
fashion photograph, wildlife photograph, landscape photograph, portrait photograph, selfie, screenshot,
video game screenshot, movie still, cartoon, sticker, icon, logo, emoji, tattoo design, map, diagram""")
STYLES = items("""impressionism, expressionism, cubism, surrealism, realism, hyperrealism, photorealism, minimalism,
pop art, art nouveau, art deco, baroque, rococo, renaissance, gothic, romanticism, pointillism, fauvism,
abstract art, abstract expressionism, futurism, constructivism, bauhaus, ukiyo-e, chinese ink painting,
byzantine icon, medieval manuscript, folk art, naive art, outsider art, street art, psychedelic art, vaporwave,
synthwave, cyberpunk, steampunk, solarpunk, dieselpunk, retro futurism, sci-fi, fantasy, dark fantasy,
horror, gothic horror, film noir, western, fairy tale, mythology, cottagecore, kawaii, chibi, studio ghibli style,
disney style, pixar style, comic style, flat design, isometric, low poly, voxel art, glitch art, double exposure,
long exposure, tilt shift, bokeh, fisheye lens, wide angle, telephoto, trending on artstation, highly detailed,
intricate, ornate, sharp focus, soft focus, blurry, grainy, noisy, high contrast, low contrast, vivid colors,
muted colors, pastel colors, monochrome, sepia, black and white, duotone, colorful, rainbow colors, neon,
8k, 4k, hd, award winning, masterpiece, amateur, professional, vintage, retro, antique, modern, contemporary,
futuristic, ancient, clean, messy, simple, complex, symmetrical, geometric, organic, textured, smooth, glossy, matte""")
LIGHTING = items("""natural light, soft light, hard light, studio lighting, rim light, backlight, side lighting,
golden hour, blue hour, sunset light, morning light, midday sun, overcast, moonlight, candlelight, firelight,
neon lights, city lights, street lights, volumetric lighting, god rays, dramatic lighting, cinematic lighting,
low key lighting, high key lighting, chiaroscuro, silhouette, glowing, bioluminescent, lens flare, foggy,
misty, hazy, rainy, snowy, stormy, sunny, cloudy, at night, in the dark, under water, in space""")
COMPOSITION = items("""close-up, extreme close-up, portrait shot, full body shot, wide shot, establishing shot,
bird's eye view, worm's eye view, from above, from below, from behind, side view, front view, top down view,
centered, rule of thirds, symmetrical composition, empty background, plain background, white background,
black background, busy background, blurred background, on a table, in a room, outdoors, indoors,
in a field, in the city, in the forest, on the beach, in the mountains, in the snow, in the rain""")
MOODS = items("""happy, sad, calm, peaceful, serene, lonely, melancholic, nostalgic, dreamy, mysterious, eerie, creepy,
scary, dramatic, epic, majestic, romantic, cozy, playful, whimsical, funny, cute, beautiful, ugly, elegant,
powerful, chaotic, energetic, tense, hopeful, dark, bright, warm, cold""")

#: Subjects that also get a coloured form ("a red car") and a medium form ("a photograph of a car").
COMMON_SUBJECTS = words("""cat dog horse bird fish butterfly dragon robot woman man girl boy car truck bicycle train ship
house castle tower bridge city forest mountain river lake ocean beach flower rose tree cake cup chair dress""")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def general_table() -> list[str]:
    subjects = [s for s in SUBJECTS if s not in {w for m in SUBJECTS_MULTI for w in m.split()}] + SUBJECTS_MULTI
    subjects = list(dict.fromkeys(subjects))
    sections: list[tuple[str, list[str]]] = [
        ("subjects", [f"{article(s)} {s}" for s in subjects]),
        ("colours", [f"{c}" for c in COLOURS] + [f"{c} and {d}" for c in COLOURS[:12] for d in COLOURS[:12] if c < d]),
        ("media", MEDIA),
        ("styles", STYLES),
        ("lighting", LIGHTING),
        ("composition", COMPOSITION),
        ("moods", MOODS),
        ("coloured subjects", [f"{article(c)} {c} {s}" for s in COMMON_SUBJECTS for c in COLOURS]),
        ("subjects in a medium", [f"{article(m)} {m} of {article(s)} {s}"
                                  for m in MEDIA[:24] for s in COMMON_SUBJECTS]),
    ]
    lines, seen = [], set()
    for title, phrases in sections:
        lines.append(f"# {title}")
        for phrase in phrases:
            if phrase not in seen:
                seen.add(phrase)
                lines.append(phrase)
    return lines


def toy_table() -> list[str]:
    """The toy world's own words: every caption, and its two parts (``a red circle``, ``on a blue background``)."""
    sys.path.insert(0, str(ROOT))
    from imageprompt_widgets.toy.world import COLOURS as TOY_COLOURS
    from imageprompt_widgets.toy.world import SHAPES, caption

    captions = [caption(c, s, b) for s in SHAPES for c in TOY_COLOURS for b in TOY_COLOURS if b != c]
    return (["# joiner: space", "# captions"] + captions
            + ["# shapes"] + [f"a {c} {s}" for c in TOY_COLOURS for s in SHAPES]
            + ["# backgrounds"] + [f"on a {c} background" for c in TOY_COLOURS])


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, lines in (("general", general_table()), ("toy", toy_table())):
        path = FOLDER / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {sum(not line.startswith('#') for line in lines)} phrases")


if __name__ == "__main__":
    main()
