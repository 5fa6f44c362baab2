"""Config loading: shipped YAMLs validate; overrides are typed; each class of mistake gives
a message naming the key and the value. (The entry point printing it without a traceback:
tests/integration/test_config_entry_point.py.)"""

from pathlib import Path

import pytest

from dlrm_torchrec.config import Config, ConfigError, load_config, validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)


def test_shipped_configs_include_the_reference_architectures():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "criteo_kaggle.yaml", "criteo_terabyte.yaml", "mlperf_dcnv2.yaml"} <= names
    kaggle = load_config("configs/criteo_kaggle.yaml")
    assert kaggle.embeddings.dim == 16
    assert [kaggle.model.dense_in_features] + kaggle.model.bottom_mlp == [13, 512, 256, 64, 16]
    assert kaggle.model.top_mlp == [512, 256, 1]
    tb = load_config("configs/criteo_terabyte.yaml")
    assert tb.embeddings.dim == 64 and tb.embeddings.max_ind_range == 10_000_000
    assert [tb.model.dense_in_features] + tb.model.bottom_mlp == [13, 512, 256, 64]
    assert tb.model.top_mlp == [512, 512, 256, 1]
    dcn = load_config("configs/mlperf_dcnv2.yaml")
    assert dcn.embeddings.dim == 128 and dcn.model.interaction == "dcn"
    assert len(dcn.data.multi_hot_sizes) == 26


def test_overrides_are_typed_by_the_field_they_set():
    cfg = load_config(None, ["data.batch_size=64", "optimizer.lr=1", "model.interaction_itself=true",
                             "model.top_mlp=32-16-1", "model.bottom_mlp=[8,16]"])
    assert cfg.data.batch_size == 64 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.interaction_itself is True
    assert cfg.model.top_mlp == [32, 16, 1]


def test_overrides_take_precedence_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 32\n  eval_samples: 64\n")
    cfg = load_config(str(f), ["data.batch_size=16"])
    assert cfg.data.batch_size == 16 and cfg.data.eval_samples == 64


@pytest.mark.parametrize("overrides, message", [
    (["data.bach_size=3"], "data.bach_size: unknown key"),
    (["nosuch.key=3"], "nosuch: unknown key"),
    (["data.batch_size=abc"], "data.batch_size: expected an integer, got 'abc'"),
    (["data.batch_size=1.5"], "data.batch_size: expected an integer, got 1.5"),
    (["model.interaction_itself=maybe"], "model.interaction_itself: expected true or false"),
    (["model.top_mlp=[1,x]"], "model.top_mlp[1]: expected an integer"),
    (["embeddings.dim=-4"], "embeddings.dim=-4: must be > 0"),
    (["model.bottom_mlp=[8,-4]"], "model.bottom_mlp[1]=-4: layer widths must be > 0"),
    (["embeddings.num_embeddings_per_feature=[10,-1]"], "num_embeddings_per_feature[1]=-1"),
    (["embeddings.dim=8"], "model.bottom_mlp=[512, 256, 64, 16]: the bottom MLP's output (16) must equal"),
    (["model.interaction=dott"], "model.interaction='dott': unknown; choose one of dot, cat, dcn"),
    (["training.loss=hinge"], "training.loss='hinge': unknown"),
    (["training.eval_split=train"], "training.eval_split='train': unknown; choose one of val, test"),
    (["optimizer.sparse=lamb"], "optimizer.sparse='lamb': unknown"),
    (["optimizer.dense=rowwise_adagrad"], "optimizer.dense='rowwise_adagrad': unknown"),
    (["model.top_mlp=[8,2]"], "the last layer must have width 1"),
    (["lr_schedule.warmup_steps=10", "lr_schedule.decay_start_step=5",
      "lr_schedule.num_decay_steps=5"], "lr_schedule.decay_start_step=5: must be >= lr_schedule.warmup_steps"),
    (["sharding.tables.t_nope.sharding_types=[table_wise]"], "sharding.tables.t_nope"),
    (["data.batch_size"], "expected key=value"),
    (["data.id_distribution=zipf"], "data.id_distribution='zipf': applies to data.source=random, not synthetic"),
    (["data.source=random", "data.id_distribution=zipf", "data.zipf_exponent=0"], "data.zipf_exponent=0.0: must be > 0"),
    (["data.id_distribution=normal"], "data.id_distribution='normal': unknown"),
    (["embeddings.dim=6", "model.bottom_mlp=[6]"],
     "embeddings.dim=6: FBGEMM's fused kernels need a multiple of 4"),
    (["embeddings.dim=6", "model.bottom_mlp=[6]", "sharding.compute_kernel=dense",
      "sharding.tables.t_cat_1.compute_kernels=[fused]"],
     "embeddings.dim=6: FBGEMM's fused kernels need a multiple of 4 (table t_cat_1)"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be >= 0"),
    (["training.loss_weights=[1,-1]"], "training.loss_weights=[1.0, -1.0]: weights must be >= 0"),
    (["training.loss_weights=[0,0]"], "training.loss_weights=[0.0, 0.0]: weights must be >= 0, and one"),
])
def test_config_errors_name_the_key_and_the_value(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_batch_size_must_divide_by_the_world_size():
    cfg = load_config(None, ["data.batch_size=30"])
    with pytest.raises(ConfigError, match=r"data.batch_size=30: must be divisible by the world size \(4\)"):
        validate(cfg, world_size=4)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data:\n  batch_size: big\n")
    with pytest.raises(ConfigError, match="wrong.yaml: data.batch_size: expected an integer, got 'big'"):
        load_config(str(wrong))


def test_errors_name_the_file_or_the_command_line_the_bad_setting_came_from(tmp_path):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data:\n  batch_size: big\n")
    with pytest.raises(ConfigError, match="wrong.yaml: data.batch_size: expected an integer, got 'big'"):
        load_config(str(wrong), ["training.epochs=2"])
    with pytest.raises(ConfigError, match="^command line: data.batch_size: expected an integer, got 'x'"):
        load_config(str(wrong), ["data.batch_size=x"])
    load_config(str(wrong), ["data.batch_size=8"])  # the command line fixes the file's value
    with pytest.raises(ConfigError, match="^command line: training.epochs: expected an integer"):
        load_config("configs/tiny_cpu.yaml", ["training.epochs=two"])
    with pytest.raises(ConfigError, match="^command line: data.bach_size: unknown key"):
        load_config("configs/tiny_cpu.yaml", ["data.bach_size=3"])


@pytest.mark.parametrize("sharding", [["sharding.compute_kernel=dense"],
                                      ["sharding.sharding_type=data_parallel"]])
def test_a_width_that_is_no_multiple_of_4_is_taken_by_the_dense_kernel(sharding):
    cfg = load_config(None, ["embeddings.dim=6", "model.bottom_mlp=[6]", *sharding])
    assert cfg.embeddings.dim == 6


def _float_keys(cls=Config, prefix=""):
    """Every float setting of the schema (lists of floats as their first item), found by
    reading the dataclasses' type hints, so a float field added later is covered too."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
        elif tp is float:
            yield key, key
        elif typing.get_args(tp) == (float,):
            yield key, f"{key}[0]"


FLOAT_KEYS = sorted(_float_keys())


def test_the_schema_has_float_settings_to_check():
    assert ("optimizer.lr", "optimizer.lr") in FLOAT_KEYS
    assert ("training.loss_weights", "training.loss_weights[0]") in FLOAT_KEYS
    assert len(FLOAT_KEYS) >= 14


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
@pytest.mark.parametrize("key, named", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_every_float_setting_refuses_a_number_that_is_not_finite(key, named, value):
    override = f"{key}=[{value},1]" if named.endswith("[0]") else f"{key}={value}"
    with pytest.raises(ConfigError, match=rf"^command line: {named.replace('[', '.').replace(']', '.')}: "
                                          "expected a finite number, got"):
        load_config(None, [override])


def test_a_yaml_infinity_is_refused_with_its_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="c.yaml: optimizer.lr: expected a finite number, got inf"):
        load_config(str(f))
