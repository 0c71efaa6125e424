"""A stand-in for Colab's ``google.colab``, for CI only: just what the example notebooks and the panel touch.

Colab's kernel imports ``google.colab`` at start-up, and the package notices it there (the panel then runs
generations inline, since Colab renders no widget updates made from other threads). To run a notebook the
way Colab does, put this folder (``tests/colab_stand_in``) on the kernel's ``PYTHONPATH`` and import
``google.colab`` at kernel start (``--IPKernelApp.exec_lines=import google.colab``): tests/test_notebooks.py
does both. ``google`` is left a namespace package so a real ``google.*`` (protobuf) still imports.

It marks itself: ``STAND_IN`` here, and ``IMAGEPROMPT_COLAB_STAND_IN=1`` in the environment, which the
notebooks' setup cell reads so it does not pip install the package from GitHub (CI has it installed).
"""

import os

from . import output

STAND_IN = True
os.environ["IMAGEPROMPT_COLAB_STAND_IN"] = "1"

__all__ = ["STAND_IN", "output"]
