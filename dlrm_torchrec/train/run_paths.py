"""The folders a training run reads and writes, checked before any work: a mistake in
logging.run_dir, checkpoint.dir or checkpoint.resume is one config error naming the key and
value, not a traceback after the model was sharded (or, for the checkpoint folder, after
the first interval trained)."""

from pathlib import Path

from dlrm_torchrec.config import Config, ConfigError
from dlrm_torchrec.data.file_checks import output_folder_problem


def check_run_paths(cfg: Config, eval_only: bool = False) -> None:
    """Raise ConfigError when a folder the run writes cannot be created or written
    (`output_folder_problem`: it is a file, or a file lies where a parent folder must be),
    when checkpoint.resume names a folder that is not there, or when `eval_only` has no
    checkpoint to evaluate."""
    for key, value in (("logging.run_dir", cfg.logging.run_dir),
                       ("checkpoint.dir", cfg.checkpoint.dir)):
        if value:
            problem = output_folder_problem(value)
            if problem is not None:
                raise ConfigError(f"{key}={value!r}: {problem}")
    resume = cfg.checkpoint.resume
    if eval_only and not resume:
        raise ConfigError("checkpoint.resume='': --eval-only evaluates a checkpoint; name it "
                          "with checkpoint.resume=<folder>, or checkpoint.resume=auto for the "
                          "newest")
    if resume and resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"checkpoint.resume={resume!r}: no such folder (use "
                              "checkpoint.resume=auto for the newest checkpoint of "
                              "checkpoint.dir, if any)")
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume={resume!r}: not a folder (a checkpoint is "
                              "the folder step_NNNNNNNN that holds its files)")
