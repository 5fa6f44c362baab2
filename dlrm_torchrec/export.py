"""`python -m dlrm_torchrec.export`: the command of `dlrm_torchrec.cli.export` (also `dlrm-export`)."""

import sys

from dlrm_torchrec.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
