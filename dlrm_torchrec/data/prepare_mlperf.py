"""`python -m dlrm_torchrec.data.prepare_mlperf`: the command of `dlrm_torchrec.cli.prepare_mlperf` (also `dlrm-prepare-mlperf`)."""

import sys

from dlrm_torchrec.cli.prepare_mlperf import main

if __name__ == "__main__":
    sys.exit(main())
