"""Reading the recipe a PNG saved by this package carries ("PNG info"), with errors a user can act on."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from PIL import Image, UnidentifiedImageError


class RecipeError(ValueError):
    """A file that carries no readable imageprompt recipe."""


def read_recipe(source: Any, name: str | None = None) -> dict[str, Any]:
    """The recipe in a PNG (a path, bytes or a file object) written by "Save PNG" or ``result.save``."""
    if isinstance(source, (str, os.PathLike)):
        name = name or os.path.basename(os.fsdecode(source))
    name = repr(name) if name else "this file"
    opened = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(opened) as image:
            text = getattr(image, "text", {}).get("imageprompt")
    except FileNotFoundError:
        raise RecipeError(f"{name} does not exist.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise RecipeError(f"{name} is not a PNG with a recipe ({err}).") from None
    if text is None:
        raise RecipeError(f"{name} carries no imageprompt recipe: only PNGs saved by this package (the "
                          "history's Save PNG, result.save) have one.")
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError:
        raise RecipeError(f"The recipe in {name} is not valid JSON.") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("settings"), dict):
        raise RecipeError(f"The recipe in {name} has no settings.")
    return recipe
