"""`python -m dlrm_torchrec.score`: the command of `dlrm_torchrec.cli.score` (also `dlrm-score`)."""

import sys

from dlrm_torchrec.cli.score import main

if __name__ == "__main__":
    sys.exit(main())
