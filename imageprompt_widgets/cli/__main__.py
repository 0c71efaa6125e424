"""``python -m imageprompt_widgets.cli``: the same as the ``imageprompt`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
