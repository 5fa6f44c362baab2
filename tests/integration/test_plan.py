"""The `plan` command: TorchRec's planner on a GPU cluster topology, run on this CPU-only
machine, places every table, accounts for every byte of the tables and their optimizer
state, and says clearly when the tables do not fit."""

import pytest

from dlrm_torchrec.cli.plan import main
from dlrm_torchrec.config import load_config
from dlrm_torchrec.parallel.planning import DoesNotFit, plan_cluster

CONFIG = "configs/tiny_cpu.yaml"
FLOAT32 = 4


def small_config(*overrides):
    return load_config(CONFIG, list(overrides))


def table_bytes(cfg):
    """Weights of every table, from the config alone: rows x dim x 4 bytes."""
    return sum(rows * cfg.embeddings.dim * FLOAT32 for rows in cfg.embeddings.table_sizes())


def test_planner_choice_on_two_gpus_places_every_table_on_valid_ranks():
    cfg = small_config()
    report = plan_cluster(cfg, nodes=1, gpus_per_node=2, hbm_gb=1.0, ddr_gb=8.0)
    names = {f"t_cat_{i}" for i in range(len(cfg.embeddings.num_embeddings_per_feature))}
    assert {t.name for t in report.tables} == names
    for t in report.tables:
        assert t.ranks and set(t.ranks) <= {0, 1}, t
    assert len(report.ranks) == 2
    assert sum(r.weight_bytes for r in report.ranks) == table_bytes(cfg)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_per_rank_weights_and_rowwise_adagrad_state_add_up_to_the_tables(sharding_type):
    cfg = small_config(f"sharding.sharding_type={sharding_type}")
    assert cfg.optimizer.sparse == "rowwise_adagrad"
    report = plan_cluster(cfg, nodes=1, gpus_per_node=2, hbm_gb=1.0, ddr_gb=8.0)
    rows = sum(cfg.embeddings.table_sizes())
    assert sum(r.weight_bytes for r in report.ranks) == table_bytes(cfg)
    # rowwise Adagrad keeps one float per row, however the rows are split
    assert sum(r.optimizer_bytes for r in report.ranks) == rows * FLOAT32
    assert all(t.sharding_type == sharding_type for t in report.tables)
    if sharding_type == "row_wise":
        assert all(t.ranks == [0, 1] for t in report.tables)
        assert all(r.weight_bytes > 0 for r in report.ranks)
    for r in report.ranks:  # the planner's estimate covers at least what the rank stores
        assert r.est_hbm_bytes >= r.weight_bytes + r.optimizer_bytes
        assert r.est_ms > 0


def test_adagrad_state_is_as_large_as_the_weights():
    cfg = small_config("optimizer.sparse=adagrad", "sharding.sharding_type=table_wise")
    report = plan_cluster(cfg, nodes=1, gpus_per_node=2, hbm_gb=1.0, ddr_gb=8.0)
    assert sum(r.optimizer_bytes for r in report.ranks) == table_bytes(cfg)


def test_command_prints_plan_and_per_rank_memory(capsys):
    assert main(["--config", CONFIG, "--nodes", "1", "--gpus-per-node", "2", "--hbm-gb", "1",
                 "--ddr-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s) x 2 cuda devices = 2 ranks" in out
    for i in range(8):
        assert f"t_cat_{i} " in out
    assert "per rank" in out and "est. HBM GB" in out


def test_too_small_hbm_fails_with_a_clear_error_and_status_2(capsys):
    cfg = small_config()
    with pytest.raises(DoesNotFit, match="do not fit on 1x2 cuda devices"):
        plan_cluster(cfg, nodes=1, gpus_per_node=2, hbm_gb=0.0005, ddr_gb=8.0)
    code = main(["--config", CONFIG, "--gpus-per-node", "2", "--hbm-gb", "0.0005"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: the embedding tables do not fit on 1x2 cuda devices")
    assert "Traceback" not in err


def test_world_size_that_does_not_divide_the_batch_is_a_config_error(capsys):
    assert main(["--config", CONFIG, "--gpus-per-node", "3"]) == 2
    assert "error: data.batch_size=256: must be divisible by the world size (3)" in \
        capsys.readouterr().err
