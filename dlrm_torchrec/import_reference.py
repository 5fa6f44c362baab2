"""`python -m dlrm_torchrec.import_reference`: the command of `dlrm_torchrec.cli.import_reference` (also `dlrm-import-reference`)."""

import sys

from dlrm_torchrec.cli.import_reference import main

if __name__ == "__main__":
    sys.exit(main())
