"""What the command-line tools share: user mistakes end as one `error:` line."""

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
