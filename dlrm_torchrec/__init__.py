"""dlrm_torchrec: a sharded DLRM trainer on TorchRec."""

import logging as _logging
import re as _re

__version__ = "0.1.0"

_FBGEMM_NO_ENTRY = _re.compile(r"no entry for (\d+)\.(\d+)\S* of FBGEMM;\s*cannot determine "
                               r"compatibility with PyTorch (\d+)\.(\d+)")


def _not_a_matching_fbgemm_notice(record: _logging.LogRecord) -> bool:
    """Root-logger filter. fbgemm-gpu warns at import, in colour, when its own compatibility
    table lacks its release (1.6.0's stops at 1.5); and `logging.warning` then also configures
    the root logger. FBGEMM 1.N goes with torch 2.(N+5), so for a pair that matches by that
    rule the notice says nothing: it is dropped. Any other pair, and FBGEMM's real mismatch
    warning, still print."""
    m = _FBGEMM_NO_ENTRY.search(record.getMessage())
    if m is None:
        return True
    fb_major, fb_minor, torch_major, torch_minor = map(int, m.groups())
    return not (fb_major == 1 and torch_major == 2 and torch_minor == fb_minor + 5)


# fbgemm_gpu logs on the root logger directly, so a filter there sees the record
_logging.getLogger().addFilter(_not_a_matching_fbgemm_notice)
