"""``python -m supervisor`` is the ``batch-supervisor`` command."""

import sys

from supervisor.cli import main

sys.exit(main())
