"""The labeller's settings are defined once: the command's defaults, params.yaml's predict section."""
import dataclasses

import pytest
import yaml

from conftest import ROOT
from ser.labeller.settings import DEFAULTS, Settings
from ser.util import UserError


def test_params_yaml_predict_section_sets_every_field_it_names_and_nothing_is_dropped():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["predict"]
    run_options = {"device", "speakers", "cluster", "cluster_certs"}  # stages/predict.py passes these to run()
    settings = Settings.from_dict({k: v for k, v in section.items() if k not in run_options})
    for name, value in section.items():
        if name not in run_options:
            assert getattr(settings, name) == value, name
    assert set(section) - run_options <= {f.name for f in dataclasses.fields(Settings)}


def test_an_unknown_key_is_named_and_a_missing_one_takes_the_default():
    with pytest.raises(UserError, match="unknown labeller setting.*batchsize"):
        Settings.from_dict({"batchsize": 8})
    assert Settings.from_dict({"batch_size": 8}) == dataclasses.replace(DEFAULTS, batch_size=8)


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "batch_size must be a positive number"),
    ({"hop_s": -1.0}, "hop_s must be a positive number"),
    ({"segment_s": True}, "segment_s must be a positive number"),
    ({"max_group_files": "200"}, "max_group_files must be a positive number"),
    ({"precision": "float16"}, "precision must be one of float32, bfloat16, int8, auto"),
    ({"adapt": "yes"}, "adapt must be true or false"),
])
def test_a_setting_that_cannot_work_is_a_clear_error(change, message):
    with pytest.raises(UserError, match=message):
        Settings.from_dict(change)


def test_the_command_line_defaults_are_the_settings_defaults(capsys):
    from ser.labeller.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert f"default {DEFAULTS.max_duration_s}" in help_text and f"default {DEFAULTS.min_group_windows}" in help_text
    assert DEFAULTS.adapt and DEFAULTS.precision == "auto" and DEFAULTS.n_jobs == -1
