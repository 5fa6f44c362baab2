"""Starting real processes for tests: gloo ranks (`run_ranks`) and command-line runs
(`run_cli`).

Both are forked from one server process that imports torch, TorchRec, FBGEMM and the package
once for the whole session (multiprocessing's forkserver with preloaded modules). A fresh
interpreter spends 5-15 s on this machine importing them, and the suite starts well over a
hundred processes. Each test still gets new processes of its own, forked from an
interpreter that has only imported modules: no process group, model or setting leaks from
one test to the next. What a fresh interpreter would inherit from the test (environment,
working directory) is passed along and set first, and what the processes print is replayed
into the test's own output, where pytest captures it.
"""

import atexit
import faulthandler
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

# what every rank and command imports; a module that fails to import here is imported (and
# fails) in the process that needs it, as it would without the server
PRELOADED = [
    "torch", "fbgemm_gpu", "torchrec", "torchmetrics", "torchrec.distributed.model_parallel",
    "dlrm_torchrec.train.job", "dlrm_torchrec.cli.train", "dlrm_torchrec.cli.export",
    "dlrm_torchrec.cli.score", "dlrm_torchrec.cli.plan", "dlrm_torchrec.cli.preprocess",
    "dlrm_torchrec.cli.from_torchrec", "dlrm_torchrec.cli.from_reference",
    "dlrm_torchrec.cli.import_reference", "dlrm_torchrec.inference.export",
]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)
    return ctx


def start_server() -> None:
    """Start the server now (it imports in the background while other tests run)."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _become(env: Dict[str, str], cwd: str, log: str) -> None:
    """Take on the environment and folder a fresh child of the test would have, and send
    fds 1 and 2 (Python's and native code's output alike) to `log`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: Any,
                env: Dict[str, str], cwd: str, logs: str) -> None:
    _become(env, cwd, os.path.join(logs, f"rank{rank}.log"))
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    # a rank that dies on a signal (SIGABRT, SIGSEGV) prints every thread's Python stack
    faulthandler.enable()
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        _flush()


def _replay(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        if text:
            sys.stderr.write(f"--- {log.stem} ---\n{text}")


def run_ranks(world_size: int, fn: Callable, *args: Any) -> None:
    """Run fn(rank, world_size, *args) in `world_size` new processes joined in one gloo
    group; raises (with the failing rank's traceback) if any fails."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        try:
            mp.start_processes(
                _rank_entry, nprocs=world_size, join=True, start_method="forkserver",
                args=(world_size, free_port(), fn, args, dict(os.environ), os.getcwd(), logs))
        finally:
            _replay(Path(logs))


def _cli_entry(module: str, argv: List[str], env: Dict[str, str], cwd: str, out: str,
               err: str) -> None:
    _become(env, cwd, out)
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        # what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
        code = 1
    # what an interpreter's exit runs (multiprocessing's children skip it)
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by the program, as an interpreter allows
            pass


def run_cli(args: Sequence[str], cwd: Optional[str] = None,
            env: Optional[Dict[str, str]] = None,
            timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` (args = ["-m", MODULE, *ARGS]) in a new process forked
    from the server, with text stdout and stderr captured, as subprocess.run(...,
    capture_output=True, text=True) returns them."""
    args = [str(a) for a in args]
    if len(args) < 2 or args[0] != "-m":
        raise ValueError(f"run_cli runs `-m MODULE ...`, not {args}")
    module, argv = args[1], args[2:]
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        Path(out).touch()
        Path(err).touch()
        proc = _context().Process(target=_cli_entry, args=(
            module, argv, dict(os.environ if env is None else env),
            os.fspath(cwd) if cwd is not None else os.getcwd(), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        code = proc.exitcode
        return subprocess.CompletedProcess(
            [sys.executable, *args], code, Path(out).read_text(errors="replace"),
            Path(err).read_text(errors="replace"))
