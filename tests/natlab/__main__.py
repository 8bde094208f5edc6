"""``python -m tests.natlab``: remove the namespaces crashed lab runs left behind."""

import sys

from tests.natlab.sweep import main

sys.exit(main())
