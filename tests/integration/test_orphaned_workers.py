"""Worker processes end when the process that started them is killed with SIGKILL (which runs
no clean-up): preprocessing's parser pool, the adoption commands' pool and the training
loader's DataLoader workers. Each test starts the tool in a subprocess, finds its worker
processes through /proc while they work, kills the tool and checks that none of them is
still running a few seconds later."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.helpers.criteo_rows import make_lines

REPO = Path(__file__).resolve().parents[2]
GRACE_SECONDS = 5.0  # how long the workers may take to go once their parent is dead


def _stat_fields(pid: int):
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int):
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(name))
    return kids


def running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended


def kill_and_check_workers(cmd, workers: int, tmp_path, find_workers=None, env=None):
    """Start `cmd`, wait until it has `workers` worker processes (`find_workers(pid)`,
    default: its children), SIGKILL it and assert that every one of them ends within
    GRACE_SECONDS."""
    env = env or dict(os.environ, PYTHONPATH=str(REPO))
    find_workers = find_workers or children
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kids = []
    try:
        deadline = time.time() + 60
        while len(kids) < workers:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the workers never started"
            time.sleep(0.01)
            kids = find_workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + GRACE_SECONDS
        while any(map(running, kids)) and time.time() < deadline:
            time.sleep(0.05)
        left = [k for k in kids if running(k)]
        assert not left, f"workers {left} of the killed process {proc.pid} are still running"
    finally:
        for k in kids:  # whatever the outcome, leave no process behind
            if running(k):
                os.kill(k, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_preprocessing_workers_exit_when_it_is_killed(tmp_path):
    block = ("\n".join(make_lines(2000, with_bad=False)) + "\n").encode()
    with open(tmp_path / "train.txt", "wb") as f:
        for _ in range(40 << 20 // len(block) + 1):  # about 40 MB: seconds of parsing
            f.write(block)
    kill_and_check_workers(
        [sys.executable, "-m", "dlrm_torchrec.data.preprocess", "train.txt", "-o", "out",
         "--dataset", "kaggle", "--max-ind-range", "1000", "--workers", "2",
         "--chunk-mb", "0.25", "--no-progress"], 2, tmp_path)


def test_adoption_workers_exit_when_it_is_killed(tmp_path):
    script = textwrap.dedent("""
        import time
        from dlrm_torchrec.data.converters.from_torchrec import map_in_workers
        list(map_in_workers(time.sleep, [(120,), (120,)], 2))
    """)
    kill_and_check_workers([sys.executable, "-c", script], 2, tmp_path)


def test_prepare_mlperf_workers_exit_when_it_is_killed(tmp_path):
    script = textwrap.dedent("""
        import time
        from dlrm_torchrec.data.converters.prepare_mlperf import _Pool
        _Pool(2, 1 << 20).run("parse", [("a", time.sleep, (120,)), ("b", time.sleep, (120,))])
    """)
    kill_and_check_workers([sys.executable, "-c", script], 2, tmp_path)


def test_loader_workers_exit_when_training_is_killed(tmp_path):
    # the workers are killed while they build a batch, when torch's own check of the parent
    # (between batches) cannot see it
    script = textwrap.dedent("""
        import time
        from dlrm_torchrec.data.loader import PrefetchingSource

        class SlowSource:
            def num_batches(self, split):
                return 4

            def batches(self, split, epoch=0, start_batch=0):
                time.sleep(120)
                yield None

        for _ in PrefetchingSource(SlowSource(), num_workers=2).batches("train"):
            pass
    """)
    kill_and_check_workers([sys.executable, "-c", script], 2, tmp_path)


def test_loader_workers_of_a_fork_server_exit_when_training_is_killed(tmp_path):
    """With multiprocessing's fork server (Python 3.14's default on Linux) the workers are
    the server's children, not the training process's: they must still end with it."""
    script = textwrap.dedent("""
        import os, time
        from dlrm_torchrec.data.loader import PrefetchingSource

        class SlowSource:
            def num_batches(self, split):
                return 4

            def batches(self, split, epoch=0, start_batch=0):
                open(f"worker-{os.getpid()}", "w").close()
                time.sleep(120)
                yield None

        if __name__ == "__main__":
            loader = PrefetchingSource(SlowSource(), num_workers=2, mp_context="forkserver")
            for _ in loader.batches("train"):
                pass
    """)
    (tmp_path / "slow_training.py").write_text(script)

    def workers_of_the_server(pid):
        kids = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert all(k not in children(pid) for k in kids)  # the server's children, not its
        return kids

    kill_and_check_workers([sys.executable, "slow_training.py"], 2, tmp_path,
                           find_workers=workers_of_the_server,
                           env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}"))


def test_a_worker_started_through_another_process_ends_with_its_owner():
    """The owner is not the worker's parent (as with a fork server, whose lifetime the
    worker cannot rely on): the worker waits on the owner itself."""
    from dlrm_torchrec.data import worker_exit

    owner = os.fork()
    if owner == 0:  # the owner: lives until the test kills it
        time.sleep(60)
        os._exit(0)
    r, w = os.pipe()
    worker = os.fork()
    if worker == 0:  # the worker: a child of the test, told to end with `owner`
        try:
            os.close(r)
            worker_exit.exit_with_parent(owner)
            os.write(w, b"armed")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 16) == b"armed"
        time.sleep(0.3)
        assert running(worker), "the worker ended while its owner was alive"
        os.kill(owner, signal.SIGKILL)
        os.waitpid(owner, 0)
        deadline = time.time() + GRACE_SECONDS
        while time.time() < deadline:
            pid, _ = os.waitpid(worker, os.WNOHANG)
            if pid:
                return
            time.sleep(0.05)
        raise AssertionError("the worker outlived its owner")
    finally:
        os.close(r)
        for pid in (owner, worker):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _fork_worker_of_short_lived_parent(arm):
    """Fork a parent that forks a worker calling `arm(parent_pid)`, then exits; returns the
    worker's pid. The worker sleeps, so only `arm` can end it."""
    r, w = os.pipe()
    parent = os.fork()
    if parent == 0:  # the short-lived parent
        os.close(r)
        me = os.getpid()
        worker = os.fork()
        if worker == 0:
            try:
                arm(me)
                os.write(w, b"armed\n")
                os.close(w)  # the test reads the pipe to its end
                time.sleep(60)
            finally:
                os._exit(0)
        os.write(w, f"{worker}\n".encode())
        time.sleep(0.2)  # let the worker arm itself first
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read().split()
    os.waitpid(parent, 0)
    assert "armed" in got, got
    return int(next(x for x in got if x.isdigit()))


def _assert_ends(pid):
    deadline = time.time() + GRACE_SECONDS
    while running(pid) and time.time() < deadline:
        time.sleep(0.05)
    if running(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"worker {pid} outlived its parent")


def test_the_watchdog_thread_ends_a_worker_where_prctl_is_unavailable(monkeypatch):
    from dlrm_torchrec.data import worker_exit

    monkeypatch.setattr(worker_exit, "_set_parent_death_signal", lambda: False)
    _assert_ends(_fork_worker_of_short_lived_parent(worker_exit.exit_with_parent))


def test_a_worker_whose_parent_died_before_it_armed_exits_at_once():
    from dlrm_torchrec.data import worker_exit

    pid = os.fork()
    if pid == 0:  # this child's parent is the test process, not the pid it is given
        try:
            worker_exit.exit_with_parent(os.getppid() + 1_000_000)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1
