"""The config schema: validation messages, command-line overrides, and the README's key table."""
import json
import os
import subprocess
import sys

import pytest

from train.config import Config, ConfigError, load_config, markdown_table, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("overrides, message", [
    ({"lrr": 0.1}, "command line: unknown config key 'lrr'; did you mean 'lr'?"),
    ({"blotch_spacng": "equal"}, "did you mean 'blotch_spacing'?"),
    ({"lr": 0}, "config key 'lr': 0 must be > 0"),
    ({"blotch_p": 1.5}, "config key 'blotch_p': 1.5 must be <= 1"),
    ({"batch_size": "8"}, "config key 'batch_size': '8' is not int"),
    ({"multi_gpu": 1}, "config key 'multi_gpu': 1 is not bool"),
    ({"torch_dtype": "fp16"}, "config key 'torch_dtype': 'fp16' is not \"float32\" | \"bfloat16\" | \"float16\""),
    ({"n_heads": 3}, "config key 'n_heads': 3 does not divide d_model 128"),
    ({"model_parallel": True}, "config key 'model_parallel': needs model_type hf or compressor"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"exp_name": "a", "lr": 0.01, "n_train_loops": 5}))
    argv = ["--lr", "1e-3", "--exp_name=b", "--separator_ids", "[5, 6]", "--n_train_loops", "null"]
    cfg = load_config(str(path), parse_overrides(argv))
    assert (cfg.exp_name, cfg.lr, cfg.separator_ids, cfg.n_train_loops) == ("b", 1e-3, [5, 6], None)
    path.write_text(json.dumps({"exp_nam": "a"}))
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'exp_nam'; did you mean 'exp_name'"):
        load_config(str(path))


def test_credentials_are_redacted():
    cfg = Config(storage_options={"key": "AKIA", "secret": "s3cr3t"})
    assert "s3cr3t" not in json.dumps(cfg.to_dict(public=True))
    assert cfg.to_dict()["storage_options"]["secret"] == "s3cr3t"


def test_readme_table_matches_schema():
    out = subprocess.run([sys.executable, "-m", "train.config", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert out == markdown_table()
    readme = open(os.path.join(ROOT, "README.md")).read()
    begin, end = "<!-- config-table:begin -->\n", "<!-- config-table:end -->"
    assert begin in readme, "README.md lacks the config table markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == out, "README.md's config table is stale: regenerate with `python -m train.config --markdown`"


@pytest.mark.parametrize("name", ["arithmetic", "openwebtext", "glue"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.json"))
    assert cfg.dataset == name
