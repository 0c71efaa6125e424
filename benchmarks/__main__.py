"""Run every CPU benchmark in turn: ``python -m benchmarks [--models tiny,real] [--quick]``.

The GPU benchmark is separate (``python -m benchmarks.gpu``) because it needs a CUDA device.
"""

from __future__ import annotations

import sys

from benchmarks import batch, cache, latency, memory, overhead, samplers, scaling

BENCHMARKS = (overhead, memory, cache, latency, scaling, samplers, batch)


def main(argv: list[str]) -> None:
    for module in BENCHMARKS:
        module.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
