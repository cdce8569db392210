import pytest

from backend.settings import SettingsError, load_settings


def test_defaults_need_no_environment():
    settings = load_settings({})
    assert settings.num_candidates == 4 and settings.policy_model == "smollm2-135m-instruct"
    assert settings.store_url.startswith("sqlite:///") and settings.store_url.endswith("store.sqlite3")


def test_values_are_read_from_upper_case_variables():
    settings = load_settings({"NUM_CANDIDATES": "6", "PPO_TRIGGER_PAIRS": "12", "MODEL_DIR": "/tmp/x"})
    assert (settings.num_candidates, settings.ppo_trigger_pairs, str(settings.model_dir)) == (6, 12, "/tmp/x")


@pytest.mark.parametrize("name,value", [("NUM_CANDIDATES", "1"), ("NUM_CANDIDATES", "four"),
                                        ("PPO_TRIGGER_PAIRS", "0"), ("RL_ALGORITHM", "a2c")])
def test_bad_value_is_one_line_naming_variable_and_value(name, value):
    with pytest.raises(SettingsError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert name in message and repr(value) in message and "\n" not in message


def test_settings_env_round_trips_defaults_and_set_optionals():
    from backend.settings import settings_env

    defaults = load_settings({})
    assert defaults.ppo_stop_nll_rise is None
    assert load_settings(settings_env(defaults)) == defaults
    tuned = load_settings({"PPO_STOP_NLL_RISE": "0.3", "SEED": "4"})
    assert load_settings(settings_env(tuned)) == tuned


def test_basic_auth_needs_user_and_password_together():
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        load_settings({"BASIC_AUTH_USER": "ls"})


def test_settings_are_frozen():
    from pydantic import ValidationError

    settings = load_settings({})
    with pytest.raises(ValidationError, match="frozen"):
        settings.num_candidates = 8


def test_readme_documents_every_setting_with_its_default():
    import re
    from pathlib import Path

    from backend.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", readme, flags=re.M))
    for name, field in Settings.model_fields.items():
        assert name.upper() in rows, f"README lacks a row for {name.upper()}"
        default = str(field.default) if field.default != "" else "(empty)"
        assert rows[name.upper()].strip().strip("`") == default, name.upper()
