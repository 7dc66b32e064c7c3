"""`python -m clipbank`, the same as the `clipbank` command."""

import sys

from clipbank.cli import main

sys.exit(main())
