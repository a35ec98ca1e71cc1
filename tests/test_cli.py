"""The command line: fast --help, recipes, doctor, and one-line errors with the right exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mlxft.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mlxft", *args], capture_output=True, text=True, env=env)


def test_help_imports_no_heavy_library():
    # --help stays fast because it imports none of the heavy libraries; that is what is checked
    # (a wall-clock limit would only measure how loaded the machine running the test is).
    code = ("import sys; from mlxft.cli import cli; "
            "from click.testing import CliRunner; r=CliRunner().invoke(cli, ['--help']); "
            "assert r.exit_code == 0, r.output; "
            "print([m for m in ('torch','transformers','mlx','peft','numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout and "export" in res.stdout


def test_every_command_has_help():
    runner = CliRunner()
    for name in cli.list_commands(None):
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output


def test_recipes_list_and_show():
    runner = CliRunner()
    res = runner.invoke(cli, ["recipes", "list", "--json"])
    names = [r["name"] for r in json.loads(res.output)]
    assert "quickstart" in names
    res = runner.invoke(cli, ["recipes", "show", "quickstart"])
    assert "mlxft train quickstart" in res.output
    res = runner.invoke(cli, ["recipes", "show", "quickstart", "--resolved"])
    assert "learning_rate" in res.output and "early_stop_patience" in res.output


def test_doctor_json_reports_auto_backend():
    res = run_cli("doctor", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["auto_backend"] in ("torch", "mlx")
    assert "cpu" in info["devices"] and "python" in info and info["auto_reason"]
    assert set(info["launchers"]) == {"torchrun", "mlx.launch"}
    if info["packages"]["torch"]:
        assert info["launchers"]["torchrun"], "torch is installed, so torchrun is"


def test_user_errors_are_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    res = run_cli("train", str(bad))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "train.steps" in res.stderr
    res = run_cli("train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path))
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    res = run_cli("train", "--set", "lora.rank=abc")
    assert res.returncode == 1 and "lora.rank" in res.stderr


def test_usage_errors_exit_2():
    res = run_cli("train", "--backend", "tpu")
    assert res.returncode == 2
    res = run_cli("generate")
    assert res.returncode == 2 and "--prompt" in res.stderr


def test_bad_data_stops_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{oops\n')
    res = run_cli("train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"))
    assert res.returncode == 1
    assert f"{data}:3: not valid JSON" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
