"""What the command-line tools share: user mistakes end as one `error:` line."""

import argparse
import math
import sys
from typing import Any, Callable, Tuple, Type


def run_tool(work: Callable[[], Any], user_errors: Tuple[Type[BaseException], ...],
             interrupted: str) -> Tuple[int, Any]:
    """(0, work()); a user mistake (one of `user_errors`) prints `error: <it>` and gives
    (2, None), Ctrl-C prints `interrupted` and gives (130, None); no traceback either way."""
    try:
        return 0, work()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130, None


def quiet_libraries() -> None:
    """TorchRec and DDP log advice meant for their developers on every start; keep errors."""
    import logging
    import warnings

    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(rec)?\.")


def finite_float(text: str) -> float:
    """argparse type of every float option: a number, and a finite one (float() also takes
    'inf', 'nan' and '1e400', which would fail later, deep inside the work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type of sizes (GB, MB): a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value
