"""``python -m imageprompt_widgets.cli``: the same as the ``imageprompt`` command."""

import sys

from . import main

sys.exit(main())
