"""`python -m dlrm_torchrec.train`: the training command of `dlrm_torchrec.cli.train`."""

import sys

from dlrm_torchrec.cli.train import main

sys.exit(main())
