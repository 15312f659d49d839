"""Settings: precedence (default < file < environment < flag), errors that name the key and the source,
the shipped example config, and the generated table in docs/CONFIG.md."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from openinfer.daemon import cli
from openinfer.daemon.config_docs import CLI_FLAGS, extract_table, format_default, render_config_table
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.settings import Settings, describe_settings, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "systemd" / "openinfer.toml"
CONFIG_DOC = ROOT / "docs" / "CONFIG.md"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "openinfer.toml"
    path.write_text(text)
    return path


def test_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, ""), environ={})
    assert settings == Settings()


def test_file_overrides_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[pool]\nworkers = 3\n[log]\nlevel = \"debug\"\n")
    settings = load_settings(path, environ={})
    assert settings.pool.workers == 3
    assert settings.log.level == "debug"
    assert settings.pool.intra_op_threads == Settings().pool.intra_op_threads  # untouched keys keep defaults


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[pool]\nworkers = 3\n[sandbox]\nlandlock = true\n")
    settings = load_settings(path, environ={"OPENINFER_POOL_WORKERS": "5", "OPENINFER_SANDBOX_LANDLOCK": "off"})
    assert settings.pool.workers == 5
    assert settings.sandbox.landlock is False


def test_flag_overrides_environment_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[pool]\nworkers = 3\n[server]\nsocket = \"ipc:///file.sock\"\n")
    environ = {"OPENINFER_POOL_WORKERS": "5", "OPENINFER_SERVER_SOCKET": "ipc:///env.sock"}
    settings = load_settings(path, environ=environ, overrides={"pool.workers": 7, "server.socket": None})
    assert settings.pool.workers == 7
    assert settings.server.socket == "ipc:///env.sock"  # a flag left at None does not override


def test_octal_socket_mode_from_file_and_environment(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, "[server]\nsocket_mode = 0o640\n"), environ={}).server.socket_mode == 0o640
    path = write_config(tmp_path, "")
    assert load_settings(path, environ={"OPENINFER_SERVER_SOCKET_MODE": "0o600"}).server.socket_mode == 0o600


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[serverr]\nsocket = \"ipc:///x\"\n", "serverr"),
        ("[pool]\nworkerz = 2\n", "pool.workerz"),
        ("[pool]\nworkers = \"four\"\n", "pool.workers"),
        ("[sandbox]\nenabled = 1\n", "sandbox.enabled"),
        ("[server]\ndrain_grace_s = true\n", "server.drain_grace_s"),
    ],
    ids=["unknown-section", "unknown-key", "wrong-type-int", "wrong-type-bool", "wrong-type-float"],
)
def test_bad_file_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert key in message
    assert str(path) in message


def test_bad_environment_value_names_key_and_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, ""), environ={"OPENINFER_POOL_WORKERS": "many"})
    assert "pool.workers" in str(caught.value)
    assert "environment" in str(caught.value)


def test_bad_flag_names_key_and_command_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={}, overrides={"pool.workerz": 2})
    assert "pool.workerz" in str(caught.value) and "command line" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={}, overrides={"server.insecure_tcp": "maybe"})
    assert "server.insecure_tcp" in str(caught.value) and "command line" in str(caught.value)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    broken = write_config(tmp_path, "[pool\nworkers = 1\n")
    with pytest.raises(ConfigError, match=re.escape(str(broken))):
        load_settings(broken, environ={})
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings(missing, environ={})


def test_shipped_example_config_loads() -> None:
    settings = load_settings(EXAMPLE_CONFIG, environ={})
    assert settings.server.models == "/var/lib/openinfer/models"
    assert settings.server.socket == "ipc:///run/openinfer/openinfer.sock"
    assert settings.server.socket_mode == 0o660
    assert settings.sandbox.enabled is True


def test_shipped_example_config_lists_every_setting_with_its_true_default() -> None:
    """Each key appears once in its section, live or commented out; commented-out values are the defaults."""
    section = ""
    seen: dict[str, str] = {}
    for line in EXAMPLE_CONFIG.read_text().splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = match.group(1)
        elif match := re.fullmatch(r"(#\s*)?(\w+) = (.+)", line.strip()):
            key = f"{section}.{match.group(2)}"
            assert key not in seen, f"{key} appears twice in {EXAMPLE_CONFIG}"
            seen[key] = match.group(3)
            if match.group(1):
                defaults = {row[0]: row[3] for row in describe_settings()}
                assert key in defaults, f"{EXAMPLE_CONFIG} documents unknown setting {key}"
                assert tomllib.loads(f"v = {match.group(3)}")["v"] == defaults[key], f"{key}: commented default is stale"
    assert sorted(seen) == sorted(row[0] for row in describe_settings()), f"{EXAMPLE_CONFIG} must list every setting"


def test_config_doc_table_is_generated_from_the_settings() -> None:
    assert extract_table(CONFIG_DOC.read_text()) == render_config_table(), (
        "docs/CONFIG.md is stale: run python -m openinfer.daemon.config_docs --write docs/CONFIG.md"
    )


def test_config_doc_table_has_a_row_per_setting() -> None:
    table = render_config_table()
    for key, env, kind, default, *_ in describe_settings():
        assert f"| `{key}` | `{env}` |" in table
        assert f"`{format_default(key, default)}`" in table


def test_documented_cli_flags_exist_on_serve() -> None:
    """The CLI column must match `openinfer serve`: every documented flag exists and every flag is documented."""
    serve_flags = {opt for param in cli.serve.params for opt in param.opts if opt.startswith("--")}
    keys = {row[0] for row in describe_settings()}
    for key, flag in CLI_FLAGS.items():
        assert key in keys, f"CLI_FLAGS names unknown setting {key}"
        assert flag in serve_flags, f"{flag} (for {key}) is not an option of `openinfer serve`"
    assert serve_flags - set(CLI_FLAGS.values()) <= {"--config", "--help", "-h"}


@pytest.mark.parametrize("value", ["10", "-1", "2.5", "true"])
def test_max_priority_outside_the_range_of_a_priority_is_refused_naming_it(tmp_path: Path, value: str) -> None:
    from openinfer.daemon.frontdoor.client_limits import load_client_policy

    policy = tmp_path / "clients.toml"
    policy.write_text(f'[uids."1000"]\nmax_priority = {value}\n')
    with pytest.raises(ConfigError, match="max_priority"):
        load_client_policy(str(policy))
    policy.write_text('[default]\nmax_priority = 0\n')
    assert load_client_policy(str(policy)).limit_for("uid=1000").max_priority == 0
