"""`python -m dlrm_torchrec.data.from_reference`: the command of `dlrm_torchrec.cli.from_reference` (also `dlrm-from-reference`)."""

import sys

from dlrm_torchrec.cli.from_reference import main

if __name__ == "__main__":
    sys.exit(main())
