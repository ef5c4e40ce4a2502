"""`python -m minimoe.lessons ...`: see minimoe/lessons/__init__.py."""

import sys

from minimoe.lessons import main

sys.exit(main())
