"""`python -m loramix` (and `torchrun -m loramix`) run the CLI."""

import sys

from loramix.cli import main

sys.exit(main())
