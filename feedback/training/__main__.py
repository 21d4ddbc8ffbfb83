"""`python -m feedback.training`: one training run (the same as `smolcord train`, with every hyperparameter)."""

import sys

from feedback.training.job import main

sys.exit(main())
