"""Reading the recipe a PNG saved by this package carries ("PNG info"), with errors a user can act on.

The reading itself is the engine's (``engine.results.recipe_from_png``: chunks before the pixels, never a
decode); the panel only words its errors for someone who just uploaded a file.
"""

from __future__ import annotations

import os
from typing import Any

from ..engine.results import ResultFileError, recipe_from_png


class RecipeError(ValueError):
    """A file that carries no readable imageprompt recipe."""


def read_recipe(source: Any, name: str | None = None) -> dict[str, Any]:
    """The recipe in a PNG (a path, bytes or a file object) written by "Save PNG" or ``result.save``."""
    if isinstance(source, (str, os.PathLike)):
        name = name or os.path.basename(os.fsdecode(source))
    name = repr(name) if name else "this file"
    try:
        recipe = recipe_from_png(source, name=name)
    except ResultFileError as err:
        raise RecipeError(_panel_words(err, name)) from None
    if not isinstance(recipe.get("settings"), dict):
        raise RecipeError(f"The recipe in {name} has no settings.")
    return recipe


def _panel_words(err: ResultFileError, name: str) -> str:
    if err.reason == "missing":
        return f"{name} does not exist."
    if err.reason == "not_png":
        return f"{name} is not a PNG with a recipe ({err})."
    if err.reason == "no_recipe":
        return (f"{name} carries no imageprompt recipe: only PNGs saved by this package (the history's Save PNG, "
                "result.save) have one.")
    return str(err)
