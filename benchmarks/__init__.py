"""Benchmarks of imageprompt_widgets against bare diffusers and the guide's code (see docs/benchmarks.md)."""
