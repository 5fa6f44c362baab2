"""`python -m dlrm_torchrec.plan`: the command of `dlrm_torchrec.cli.plan` (also `dlrm-plan`)."""

import sys

from dlrm_torchrec.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
