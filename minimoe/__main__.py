"""`python -m minimoe ...`: the same command line as the `minimoe` console script."""

from minimoe.cli import main

raise SystemExit(main())
