"""Command-line options: every number option is checked by argparse, so 'inf', 'nan' or a
negative size ends as argparse's one usage line with exit status 2, before any work."""

import ast
from pathlib import Path

import pytest

from dlrm_torchrec.cli import plan as plan_cli
from dlrm_torchrec.cli import prepare_mlperf as prepare_mlperf_cli
from dlrm_torchrec.cli import preprocess as preprocess_cli

CLI = Path(__file__).resolve().parents[2] / "dlrm_torchrec" / "cli"


def _float_options():
    """(file, option) of every add_argument(..., type=float) in the commands' sources."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                for kw in node.keywords:
                    if kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id == "float":
                        found.append((path.name, node.args[0].value))
    return found


def test_no_command_takes_a_bare_float_option():
    # float() takes 'inf' and 'nan': float options use cli.finite_float or positive_float
    assert _float_options() == []


@pytest.mark.parametrize("parse, argv, message", [
    (plan_cli.parse_args, ["--config", "c.yaml", "--hbm-gb", "nan"],
     "argument --hbm-gb: expected a finite number, got 'nan'"),
    (plan_cli.parse_args, ["--config", "c.yaml", "--ddr-gb", "1e400"],
     "argument --ddr-gb: expected a finite number, got '1e400'"),
    (plan_cli.parse_args, ["--config", "c.yaml", "--hbm-gb", "0"],
     "argument --hbm-gb: must be > 0, got '0'"),
    (preprocess_cli.parse_args, ["x.txt", "-o", "out", "--dataset", "kaggle", "--chunk-mb", "inf"],
     "argument --chunk-mb: expected a finite number, got 'inf'"),
    (preprocess_cli.parse_args, ["x.txt", "-o", "out", "--dataset", "kaggle", "--chunk-mb=-2"],
     "argument --chunk-mb: must be > 0, got '-2'"),
    (preprocess_cli.parse_args, ["x.txt", "-o", "out", "--dataset", "kaggle",
                                 "--sub-sample-rate=-inf"],
     "argument --sub-sample-rate: expected a finite number, got '-inf'"),
    (prepare_mlperf_cli.parse_args, ["d.gz", "-o", "out", "--memory-gb", "inf"],
     "argument --memory-gb: expected a finite number, got 'inf'"),
    (prepare_mlperf_cli.parse_args, ["d.gz", "-o", "out", "--memory-gb", "0"],
     "argument --memory-gb: must be > 0, got '0'"),
    (preprocess_cli.parse_args, ["x.txt", "-o", "out", "--dataset", "kaggle",
                                 "--sub-sample-rate", "half"],
     "argument --sub-sample-rate: expected a number, got 'half'"),
])
def test_number_options_that_are_not_finite_or_not_positive_are_usage_errors(parse, argv,
                                                                            message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
