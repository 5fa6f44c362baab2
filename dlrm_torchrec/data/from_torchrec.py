"""`python -m dlrm_torchrec.data.from_torchrec`: the command of `dlrm_torchrec.cli.from_torchrec` (also `dlrm-from-torchrec`)."""

import sys

from dlrm_torchrec.cli.from_torchrec import main

if __name__ == "__main__":
    sys.exit(main())
