"""`python -m dlrm_torchrec.data.preprocess`: the command of `dlrm_torchrec.cli.preprocess` (also `dlrm-preprocess`)."""

import sys

from dlrm_torchrec.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
