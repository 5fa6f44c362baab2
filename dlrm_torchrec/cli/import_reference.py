"""`python -m dlrm_torchrec.import_reference` (also `dlrm-import-reference`): turn a model saved by the DLRM reference into a checkpoint (`inference.import_reference`)."""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from dlrm_torchrec.cli import run_tool
from dlrm_torchrec.config import ConfigError, load_config
from dlrm_torchrec.data.file_checks import output_folder_problem
from dlrm_torchrec.inference.import_reference import ReferenceModelError, import_reference


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.import_reference",
        description="Turn a model saved by the DLRM reference (dlrm_s_pytorch.py --save-model) "
                    "into a checkpoint of this project (OUT/step_00000000).")
    ap.add_argument("model", help="the reference's --save-model file")
    ap.add_argument("--config", required=True, help="YAML config describing that model")
    ap.add_argument("-o", "--out", required=True, help="folder for the checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return ap.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)

    def work():
        problem = output_folder_problem(a.out)  # before the model is read
        if problem is not None:
            raise ConfigError(f"-o {a.out}: {problem}")
        cfg = load_config(a.config, a.overrides)
        return import_reference(a.model, cfg, Path(a.out),
                                log=lambda m: print(m, file=sys.stderr))

    rc, _ = run_tool(work, (ReferenceModelError, ConfigError), "interrupted; nothing was written")
    return rc


if __name__ == "__main__":
    sys.exit(main())
