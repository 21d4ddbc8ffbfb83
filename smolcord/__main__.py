"""`python -m smolcord` is the `smolcord` command."""

import sys

from smolcord.cli import main

sys.exit(main())
