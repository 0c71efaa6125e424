"""Quiet the model libraries while they load: their reports and progress bars are not for our users.

The engine reports loading itself (a status line, a progress bar); transformers and diffusers would
otherwise print that the unused CLIP text tower was skipped, or warn about optional torchvision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loaders() -> Iterator[None]:
    """Hide the loaders' reports (the unused CLIP text tower is expected) and their progress bars.

    Our own status line reports loading; the libraries' settings are restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    hf_saved = (hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()  # before diffusers' import, which warns about optional torchvision
    from diffusers.utils import logging as diffusers_logging

    saved = [hf_saved, (diffusers_logging, diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled())]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
