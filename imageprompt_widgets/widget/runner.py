"""Kept for compatibility: the runners live on the engine side now (:mod:`imageprompt_widgets.runners`)."""

from ..runners import InlineRunner, Runner, ThreadRunner, default_runner, in_colab

__all__ = ["InlineRunner", "Runner", "ThreadRunner", "default_runner", "in_colab"]
