"""TorchX components in launch/components.py: validation, AppDefs, scheduler dry runs, a real
local_cwd run.

Components are loaded the way `torchx run launch/components.py:NAME` loads them (torchx's
file linter, then its argument parser), so a docstring or annotation torchx cannot read
fails here rather than on a user's command line.
"""

import glob
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml
from torchx.runner import get_runner
from torchx.schedulers import slurm_scheduler
from torchx.specs import AppDef, AppState, BindMount, VolumeMount
from torchx.specs.builders import materialize_appdef, parse_args
from torchx.specs.file_linter import get_fn_docstring, validate
from torchx.specs.finder import get_component

REPO = Path(__file__).resolve().parents[2]
COMPONENTS_FILE = REPO / "launch" / "components.py"
COMPONENTS = ("train_cpu", "train_gpu")
MODULE = "dlrm_torchrec.train"


def component_name(name: str) -> str:
    return f"{COMPONENTS_FILE}:{name}"


def build(name: str, cli_args: List[str]) -> AppDef:
    """The AppDef `torchx run launch/components.py:NAME CLI_ARGS` would submit."""
    return materialize_appdef(get_component(component_name(name)).fn, cli_args)


def torchrun_argv(app: AppDef) -> List[str]:
    """The `bash -c` command line of the only role, split like bash would."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


def option(argv: List[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def trainer_args(argv: List[str]) -> List[str]:
    """Everything torchrun hands to `python -m dlrm_torchrec.train`."""
    i = argv.index("-m")
    assert argv[i + 1] == MODULE
    return argv[i + 2 :]


# ---------------------------------------------------------------- validation, --help


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_passes_torchx_file_linter(name):
    assert [m.description for m in validate(str(COMPONENTS_FILE), name)] == []
    # get_component raises ComponentValidationException on any linter error
    assert get_component(component_name(name)).fn.__name__ == name


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_component_argument_is_documented(name):
    fn = get_component(component_name(name)).fn
    description, args_help = get_fn_docstring(fn)
    assert "TIP" not in description  # torchx's placeholder for a missing docstring
    undocumented = [arg for arg, text in args_help.items() if not text.strip()]
    assert undocumented == []


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_help_renders_like_torchx_run_help(name, capsys):
    fn = get_component(component_name(name)).fn
    with pytest.raises(SystemExit) as exit_info:
        parse_args(fn, ["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--config", "-j", "-h", "--cpu", "--memMB", "--env", "--max_retries",
                 "--mounts", "--image", "--rdzv_port"):
        assert flag in help_text


# ---------------------------------------------------------------- AppDefs


def test_train_cpu_defaults_run_tiny_config_on_two_local_ranks():
    app = build("train_cpu", [])
    (role,) = app.roles
    assert app.name == "dlrm"
    assert role.name == "train"
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (1, 1, 0)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (2, 0, 8192)
    argv = torchrun_argv(app)
    assert argv[0] == "torchrun"
    assert option(argv, "--nnodes") == "1"
    assert option(argv, "--nproc_per_node") == "2"
    # one node: torchelastic picks a free port instead of rdzv_port
    assert option(argv, "--rdzv_endpoint") == "localhost:0"
    assert trainer_args(argv) == ["--config", "configs/tiny_cpu.yaml"]
    assert role.env["GLOO_SOCKET_IFNAME"] == "lo"
    assert role.env["OMP_NUM_THREADS"] == "1"  # 2 cores / 2 ranks


def test_overrides_follow_the_config_file_in_order():
    app = build("train_cpu", ["--config", "configs/other.yaml", "--",
                              "training.max_steps=5", "logging.run_dir=/tmp/run a"])
    assert trainer_args(torchrun_argv(app)) == [
        "--config", "configs/other.yaml", "training.max_steps=5", "logging.run_dir=/tmp/run a"]


def test_train_cpu_multi_node_uses_rank0_rendezvous_and_no_loopback():
    app = build("train_cpu", ["-j", "3x4", "--cpu", "16", "--max_retries", "2",
                              "--rdzv_port", "29999"])
    (role,) = app.roles
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (3, 3, 2)
    argv = torchrun_argv(app)
    assert option(argv, "--nnodes") == "3"
    assert option(argv, "--nproc_per_node") == "4"
    # the rank0_env macro becomes each scheduler's "first node" variable at submit time
    assert option(argv, "--rdzv_endpoint") == "$${${rank0_env}:=localhost}:29999"
    assert role.port_map == {"c10d": 29999}
    assert "GLOO_SOCKET_IFNAME" not in role.env  # peers are on other hosts
    assert role.env["OMP_NUM_THREADS"] == "4"


def test_elastic_node_range():
    (role,) = build("train_cpu", ["-j", "1:4x2"]).roles
    assert (role.min_replicas, role.num_replicas) == (1, 4)


def test_user_env_overrides_defaults():
    (role,) = build("train_cpu", ["--env", "OMP_NUM_THREADS=7,GLOO_SOCKET_IFNAME=eth0,X=1"]).roles
    assert role.env["OMP_NUM_THREADS"] == "7"
    assert role.env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert role.env["X"] == "1"


def test_named_resource_replaces_cpu_and_memory():
    (role,) = build("train_cpu", ["-h", "cpu.xlarge"]).roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 0, 32 * 1024)


def test_mounts_are_parsed_for_container_schedulers():
    (role,) = build("train_cpu", ["--mounts",
                                  "type=bind,src=/data,dst=/data,readonly,type=volume,src=ckpt,dst=/ckpt"]).roles
    assert role.mounts == [BindMount(src_path="/data", dst_path="/data", read_only=True),
                           VolumeMount(src="ckpt", dst_path="/ckpt", read_only=False)]


def test_train_gpu_two_nodes_of_eight():
    app = build("train_gpu", ["--config", "configs/big.yaml", "-j", "2x8", "--max_retries", "3",
                              "--", "data.batch_size=8192"])
    (role,) = app.roles
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (2, 2, 3)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 262144)
    argv = torchrun_argv(app)
    assert option(argv, "--nnodes") == "2"
    assert option(argv, "--nproc_per_node") == "8"
    assert trainer_args(argv) == ["--config", "configs/big.yaml", "data.batch_size=8192"]
    assert role.env["NCCL_DEBUG"] == "WARN"
    assert role.env["OMP_NUM_THREADS"] == "8"
    assert "GLOO_SOCKET_IFNAME" not in role.env


def test_train_gpu_takes_gpus_from_named_resource():
    (role,) = build("train_gpu", ["--config", "c.yaml", "-h", "aws_p5.48xlarge", "-j", "2x8"]).roles
    assert (role.resource.cpu, role.resource.gpu) == (192, 8)


def test_train_gpu_requires_a_config():
    with pytest.raises(SystemExit):
        build("train_gpu", [])


def test_train_gpu_rejects_more_ranks_than_gpus():
    with pytest.raises(ValueError, match="nproc_per_node <= 4"):
        build("train_gpu", ["--config", "c.yaml", "-j", "1x8", "--gpu", "4"])


# ---------------------------------------------------------------- scheduler dry runs


def sbatch_groups(script: str) -> List[Dict[str, str]]:
    """`#SBATCH` lines of a torchx script, one dict of options per het group (= per node)."""
    groups = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH ") or line == "#SBATCH hetjob":
            continue
        opts = {}
        for word in line[len("#SBATCH "):].split():
            key, _, value = word.partition("=")
            opts[key] = value
        groups.append(opts)
    return groups


@pytest.fixture
def no_sinfo(monkeypatch):
    # torchx asks `sinfo` for the partition's memory and drops --mem on tiny partitions;
    # keep the dry run independent of whether this machine runs a Slurm cluster.
    monkeypatch.setattr(slurm_scheduler.SlurmScheduler, "_partition_memmb",
                        lambda self, partition: None)


def test_slurm_dryrun_renders_two_gpu_nodes(no_sinfo):
    with get_runner() as runner:
        info = runner.dryrun_component(
            component_name("train_gpu"),
            ["--config", "configs/big.yaml", "-j", "2x8", "--max_retries", "1", "--",
             "data.batch_size=8192"],
            "slurm",
            cfg={"partition": "gpu", "time": "02:00:00"},
        )
    script = info.request.materialize()
    groups = sbatch_groups(script)
    assert len(groups) == 2  # torchx submits one heterogeneous group per node
    for node, opts in enumerate(groups):
        assert opts["--job-name"] == f"train-{node}"
        assert opts["--ntasks-per-node"] == "1"  # one torchrun per node, it starts 8 ranks
        assert opts["--gpus-per-task"] == "8"
        assert opts["--cpus-per-task"] == "64"
        assert opts["--mem"] == "262144"
        assert opts["--time"] == "02:00:00"
        assert opts["--partition"] == "gpu"
        assert "--requeue" in opts
    assert script.count("#SBATCH hetjob") == 1
    assert "export TORCHX_MAX_RETRIES=1" in script
    srun = script[script.index("\nsrun "):script.index("\nexitcode=")]
    assert srun.count("torchrun") == 2
    assert srun.count("--nnodes 2 --nproc_per_node 8") == 2
    # every node meets at the first node of het group 0
    assert srun.count("--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500") == 2
    assert srun.count("-m dlrm_torchrec.train --config configs/big.yaml data.batch_size=8192") == 2
    assert srun.count("NCCL_DEBUG=WARN") == 2
    assert srun.count("--kill-on-bad-exit=1") == 2


def test_slurm_dryrun_of_cpu_default_is_one_node(no_sinfo):
    with get_runner() as runner:
        info = runner.dryrun_component(component_name("train_cpu"), [], "slurm", cfg={})
    (opts,) = sbatch_groups(info.request.materialize())
    assert opts["--cpus-per-task"] == "2"
    assert opts["--mem"] == "8192"
    assert "--gpus-per-task" not in opts
    assert "--time" not in opts  # .torchxconfig is CLI-only; the runner saw no time


def test_preprocessing_runs_as_a_plain_slurm_job_as_the_readme_says(no_sinfo):
    """The README's line: torchx's own utils.python component, one task with 32 CPUs."""
    with get_runner() as runner:
        info = runner.dryrun_component("utils.python", [
            "--m", "dlrm_torchrec.data.preprocess", "--cpu", "32", "--memMB", "65536", "--",
            "--dataset", "terabyte", "/data/day_0.gz", "/data/day_1.gz", "-o",
            "/shared/criteo_tb", "--workers", "30"], "slurm", cfg={})
    script = info.request.materialize()
    (opts,) = sbatch_groups(script)
    assert opts["--cpus-per-task"] == "32" and opts["--mem"] == "65536"
    assert ("python -m dlrm_torchrec.data.preprocess --dataset terabyte /data/day_0.gz "
            "/data/day_1.gz -o /shared/criteo_tb --workers 30") in script


def test_kubernetes_dryrun_renders_volcano_job():
    pytest.importorskip("kubernetes")
    with get_runner() as runner:
        info = runner.dryrun_component(
            component_name("train_gpu"),
            ["--config", "configs/big.yaml", "-j", "2x8", "--max_retries", "2",
             "--image", "registry.example/dlrm:1", "--mounts", "type=volume,src=criteo,dst=/data"],
            "kubernetes",
            cfg={"queue": "research", "namespace": "ml"},
            workspace=None,  # the image already holds the code: no docker build
        )
    job = yaml.safe_load(str(info.request))  # the YAML torchx submits
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1"
    assert job["kind"] == "Job"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano"
    assert spec["queue"] == "research"
    assert spec["maxRetry"] == 2
    # svc publishes every pod's hostname as VC_<task>_HOSTS for the rendezvous
    assert "svc" in spec["plugins"]
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["train-0", "train-1"]
    for node, task in enumerate(tasks):
        assert task["replicas"] == 1
        assert task["minAvailable"] == 1
        assert task["maxRetry"] == 2
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/dlrm:1"
        resources = container["resources"]
        assert resources["limits"] == {"cpu": "64000m", "memory": "262144M", "nvidia.com/gpu": "8"}
        assert resources["requests"]["nvidia.com/gpu"] == "8"
        assert container["ports"] == [{"containerPort": 29500, "name": "c10d"}]
        assert container["command"][:2] == ["bash", "-c"]
        argv = shlex.split(container["command"][2])
        assert option(argv, "--nnodes") == "2"
        assert option(argv, "--nproc_per_node") == "8"
        assert trainer_args(argv) == ["--config", "configs/big.yaml"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_DEBUG"] == "WARN"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts and "/data" in mounts
        volumes = {v["name"]: v for v in task["template"]["spec"]["volumes"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "criteo"
        # rank 0 hosts the c10d store itself; the others find it through Volcano's env
        if node == 0:
            assert env["TORCHX_RANK0_HOST"] == "localhost"
            assert option(argv, "--rdzv_endpoint") == "${TORCHX_RANK0_HOST:=localhost}:29500"
        else:
            assert option(argv, "--rdzv_endpoint") == "${VC_TRAIN_0_HOSTS:=localhost}:29500"


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_local_cwd_run_of_tiny_config_on_two_cpu_ranks_writes_metrics(tmp_path, monkeypatch):
    # local_cwd runs `bash -c "torchrun ..."` in the current directory: this interpreter's
    # torchrun must come first on PATH and the repository must be the working directory.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "torchx"
    with get_runner() as runner:
        handle = runner.run_component(
            component_name("train_cpu"),
            ["-j", "1x2", "--", f"logging.run_dir={run_dir}"],
            "local_cwd",
            cfg={"log_dir": str(log_dir)},
        )
        status = runner.wait(handle, wait_interval=1)
    logs = "".join(Path(p).read_text()[-3000:]
                   for p in glob.glob(f"{log_dir}/**/*.log", recursive=True))
    assert status is not None and status.state == AppState.SUCCEEDED, logs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] > 0, metrics
