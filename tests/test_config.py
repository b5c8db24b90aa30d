"""Config: defaults < TOML < environment < explicit overrides, and bad input is a clear ValueError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import Config, load_config


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "idunno.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.host == "127.0.0.1"
    assert cfg.coordinator == "127.0.0.1:7100"
    assert cfg.heartbeat_interval == 0.5
    assert cfg.liveness == 3
    assert cfg.replication_factor == 4
    assert cfg.write_quorum == 0
    assert cfg.max_versions == 5
    assert cfg.max_frame_bytes == 8 * 1024 * 1024
    assert cfg.coordinators == ["127.0.0.1:7100"]


def test_unrelated_environment_is_ignored() -> None:
    cfg = load_config(env={"HOME": "/nowhere", "IDUNNO": "x", "IDUNNO_": "y", "heartbeat_interval": "9"})
    assert cfg == Config()


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'host = "10.0.0.5"\nheartbeat_interval = 0.25\nliveness = 5\nstandby = "10.0.0.6:7100"\n',
    )
    cfg = load_config(path, env={})
    assert cfg.host == "10.0.0.5"
    assert cfg.heartbeat_interval == 0.25
    assert cfg.liveness == 5
    assert cfg.coordinators == ["127.0.0.1:7100", "10.0.0.6:7100"]
    assert cfg.replication_factor == 4  # untouched keys keep their defaults


def test_toml_idunno_table_is_used(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[idunno]\nreplication_factor = 3\nmax_versions = 2\n")
    cfg = load_config(path, env={})
    assert (cfg.replication_factor, cfg.max_versions) == (3, 2)


def test_toml_path_from_idunno_config_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "liveness = 7\n")
    assert load_config(env={"IDUNNO_CONFIG": path}).liveness == 7
    # an explicit path wins over IDUNNO_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("liveness = 9\n")
    assert load_config(str(other), env={"IDUNNO_CONFIG": path}).liveness == 9


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "heartbeat_interval = 0.25\nliveness = 5\n")
    cfg = load_config(path, env={"IDUNNO_HEARTBEAT_INTERVAL": "0.1"})
    assert cfg.heartbeat_interval == 0.1
    assert isinstance(cfg.heartbeat_interval, float)
    assert cfg.liveness == 5


def test_env_values_are_coerced_to_field_types() -> None:
    cfg = load_config(env={"IDUNNO_LIVENESS": "4", "IDUNNO_HOST": "0.0.0.0", "IDUNNO_REQUEST_TIMEOUT": "2"})
    assert cfg.liveness == 4 and isinstance(cfg.liveness, int)
    assert cfg.host == "0.0.0.0"
    assert cfg.request_timeout == 2.0 and isinstance(cfg.request_timeout, float)


def test_explicit_overrides_beat_env_and_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "heartbeat_interval = 0.25\n")
    env = {"IDUNNO_HEARTBEAT_INTERVAL": "0.1"}
    assert load_config(path, env=env, heartbeat_interval=0.05).heartbeat_interval == 0.05
    # None means "not given on the command line": the lower layers still apply
    assert load_config(path, env=env, heartbeat_interval=None).heartbeat_interval == 0.1


def test_unknown_key_in_toml_raises(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "heartbeat_intervall = 0.2\n")
    with pytest.raises(ValueError, match="heartbeat_intervall"):
        load_config(path, env={})


def test_unknown_override_raises() -> None:
    with pytest.raises(ValueError, match="unknown config keys: bogus"):
        load_config(env={}, bogus=1)
    with pytest.raises(ValueError, match="unknown config keys: extra"):
        load_config(env={}, extra={"a": 1})  # there is no free-form bag of settings


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"IDUNNO_HEARTBEAT_INTERVAL": "fast"}, "heartbeat_interval"),
        ({"IDUNNO_LIVENESS": "three"}, "liveness"),
        ({"IDUNNO_LIVENESS": "2.5"}, "liveness"),
        ({"IDUNNO_REPLICATION_FACTOR": ""}, "replication_factor"),
    ],
)
def test_bad_env_value_raises_clear_error(env: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(env=env)
    text = str(info.value)
    assert field in text
    assert repr(next(iter(env.values()))) in text


def test_bad_toml_value_raises_clear_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'liveness = "lots"\n')
    with pytest.raises(ValueError, match=r"config liveness: 'lots' is not a whole number"):
        load_config(path, env={})
    path = write_toml(tmp_path, "heartbeat_interval = [1, 2]\n")
    with pytest.raises(ValueError, match="heartbeat_interval"):
        load_config(path, env={})


@pytest.mark.parametrize(
    "changes",
    [
        {"heartbeat_interval": 0},
        {"heartbeat_interval": -1.0},
        {"liveness": 0},
        {"replication_factor": 0},
        {"replication_factor": -3},
        {"state_commit_interval": -0.01},
        {"state_commit_interval": 5.0},
        {"compute_nice": -1},
        {"compute_nice": 20},
    ],
)
def test_out_of_range_values_raise(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        load_config(env={}, **changes)


@pytest.mark.parametrize("value", [2.7, True])
def test_non_integer_for_int_field_raises(tmp_path: Path, value: object) -> None:
    path = write_toml(tmp_path, f"liveness = {str(value).lower()}\n")
    with pytest.raises(ValueError, match="liveness"):
        load_config(path, env={})


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_heartbeat_interval_raises(value: str) -> None:
    with pytest.raises(ValueError):
        load_config(env={"IDUNNO_HEARTBEAT_INTERVAL": value})


@pytest.mark.parametrize(("interval", "liveness"), [(0.5, 3), (0.1, 1), (2.0, 7), (0.25, 4)])
def test_failure_timeout_is_interval_times_liveness(interval: float, liveness: int) -> None:
    cfg = load_config(env={}, heartbeat_interval=interval, liveness=liveness)
    assert cfg.failure_timeout == pytest.approx(interval * liveness)
    assert Config(heartbeat_interval=interval, liveness=liveness).failure_timeout == pytest.approx(interval * liveness)


def test_effective_write_quorum_defaults_to_a_majority() -> None:
    cfg = Config()
    assert cfg.write_quorum == 0
    for n in range(1, 12):
        assert cfg.effective_write_quorum(n) == n // 2 + 1


@pytest.mark.parametrize("write_quorum", range(-2, 13))
def test_effective_write_quorum_is_between_majority_and_n(write_quorum: int) -> None:
    cfg = Config(write_quorum=write_quorum)
    for n in range(1, 12):
        w = cfg.effective_write_quorum(n)
        assert n // 2 + 1 <= w <= n, (write_quorum, n, w)
        if write_quorum <= 0:
            assert w == n // 2 + 1
        elif n // 2 + 1 <= write_quorum <= n:
            assert w == write_quorum  # a legal request is honoured exactly


def test_replace_returns_a_modified_copy() -> None:
    cfg = Config()
    other = cfg.replace(replication_factor=2)
    assert other.replication_factor == 2 and cfg.replication_factor == 4
    assert dataclasses.replace(cfg) == cfg
