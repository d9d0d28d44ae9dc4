"""config.toml and the daemon's flags: every flag has a key, the file is typed and
checked, flags win over it, and what ``swarm init`` writes is accepted as it is.

These read the config the way ``swarm daemon`` does (``config_file.node_config``),
without starting a node; test_cli_gateway.py starts real ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from node.cli import config_file
from node.cli import main as cli
from node.cli.config_file import FileSettings
from node.config import NodeConfig
from node.jobs.fairness import FairnessConfig
from node.jobs.router import Strategy
from protocols.errors import ConfigError

PEER_A = "/ip4/127.0.0.1/tcp/7001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
PEER_B = "/ip4/127.0.0.1/tcp/7002/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"


def daemon_config(*flags: str, before: tuple[str, ...] = ()) -> tuple[NodeConfig, str, str]:
    """The config ``swarm [BEFORE...] daemon FLAGS...`` would run with."""
    args = cli._parser().parse_args([*before, "daemon", *flags])
    return config_file.node_config(args)


def model_names(config: NodeConfig) -> list[str]:
    return [s if isinstance(s, str) else s.name for s in config.models]


def daemon_parser() -> argparse.ArgumentParser:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices["daemon"]
    return found


def option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_daemon_flag_has_a_config_key() -> None:
    # The global --log-level/--log-format count too: the daemon reads them from the file.
    flags = option_dests(daemon_parser()) | option_dests(cli._parser())
    missing = flags - set(config_file.FLAG_KEYS) - set(config_file.NOT_IN_FILE)
    assert not missing, f"daemon flags with no config.toml key: {sorted(missing)}"
    stale = set(config_file.FLAG_KEYS) - flags
    assert not stale, f"config keys for flags that no longer exist: {sorted(stale)}"
    fields = {f.name for f in dataclasses.fields(FileSettings)}
    for dest, key in config_file.FLAG_KEYS.items():
        table, _, name = key.partition(".")
        if table == "node":
            assert name in fields, (dest, key)
        elif table in ("http", "grpc"):
            assert f"{table}_{name}" in fields, (dest, key)
        else:
            assert key in ("models", "router.strategy", "fairness.enabled"), (dest, key)


def switched_on(template: str) -> str:
    """The template's [node], [http] and [grpc] tables with every `# key = value` uncommented."""
    part = template[template.index("[node]") : template.index("# -- models")]
    return re.sub(r"^# ([a-z_]+ = )", r"\1", part, flags=re.M)


def test_every_key_is_listed_in_the_template_with_its_default() -> None:
    template = (Path(cli.__file__).parent / "default_config.toml").read_text()
    tables = tomllib.loads(switched_on(template))
    for key in config_file.FLAG_KEYS.values():
        table, _, name = key.partition(".")
        if table in ("node", "http", "grpc"):
            assert name in tables[table], f"{key} is not in default_config.toml"
    # Each value shown is the reader's default, except for the keys whose default is
    # "unset" (an example is shown) and the gateway's listen (see the next test).
    defaults = FileSettings()
    shown = {
        **tables["node"],
        **{f"{t}_{k}": v for t in ("http", "grpc") for k, v in tables[t].items()},
    }
    unset = ("swarm_key", "http_token_env", "http_listen", "grpc_token_env", "grpc_listen")
    for key, value in shown.items():
        if key in (*unset, "log_level"):
            continue
        default = getattr(defaults, key)
        assert value == (list(default) if isinstance(default, tuple) else default), key
    assert tables["node"]["log_level"] == "INFO"  # the daemon's level when unset
    assert tables["http"]["listen"] == config_file.DEFAULT_HTTP
    assert tables["grpc"]["listen"] == config_file.DEFAULT_GRPC


def test_the_fairness_template_shows_the_defaults_and_the_flag_wins(tmp_path: Path) -> None:
    template = (Path(cli.__file__).parent / "default_config.toml").read_text()
    part = template[template.index("[fairness]") :]
    part = part.split("\n# -- ", 1)[0]  # up to the next section
    table = tomllib.loads(re.sub(r"^# ([a-z_]+ = )", r"\1", part, flags=re.M))["fairness"]
    defaults = FairnessConfig()
    shown = {f.name for f in dataclasses.fields(FairnessConfig)}
    assert set(table) == shown, "every [fairness] key is listed in default_config.toml"
    for key, value in table.items():
        assert value == getattr(defaults, key), key
    path = tmp_path / "c.toml"
    path.write_text(f'[fairness]\nrate = 5.0\nweights = {{ "{PEER_A.split("/")[-1]}" = 2 }}\n')
    config, _, _ = daemon_config("--config", str(path))
    assert config.fairness.enabled and config.fairness.rate == 5.0
    assert config.fairness.weights == {PEER_A.split("/")[-1]: 2.0}
    config, _, _ = daemon_config("--config", str(path), "--no-fair-share")
    assert not config.fairness.enabled and config.fairness.rate == 5.0
    path.write_text("[fairness]\nenabled = false\n")
    assert not daemon_config("--config", str(path))[0].fairness.enabled
    assert daemon_config("--config", str(path), "--fair-share")[0].fairness.enabled
    path.write_text("[fairness]\nin_flite = 3\n")
    with pytest.raises(ConfigError, match="fairness: unknown field"):
        daemon_config("--config", str(path))


def test_init_writes_a_config_the_daemon_accepts(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    assert cli.main(["init", "--data-dir", str(data_dir)]) == 0
    config, level, log_format = daemon_config("--data-dir", str(data_dir))
    assert model_names(config) == ["all-minilm-l6-v2"]  # the one uncommented model
    assert config.http is not None and config.http_fallback
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8470)
    assert config.grpc is not None and config.grpc_fallback
    assert (config.grpc.host, config.grpc.port) == ("127.0.0.1", 8471)
    assert (level, log_format, config.listen) == ("INFO", "text", ("/ip4/0.0.0.0/tcp/7420",))
    # A second init refuses to overwrite the first.
    assert cli.main(["init", "--data-dir", str(data_dir)]) == 2


def test_init_with_every_key_uncommented_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `# key = value` line of [node], [http] and [grpc], switched on, reads cleanly."""
    data_dir = tmp_path / "node"
    assert cli.main(["init", "--data-dir", str(data_dir)]) == 0
    path = data_dir / config_file.CONFIG_FILE
    text = path.read_text()
    part = text[text.index("[node]") : text.index("# -- models")]
    path.write_text(text.replace(part, switched_on(text)))
    assert cli.main(["keygen", str(data_dir / "swarm.key")]) == 0  # the example key file
    monkeypatch.setenv("SWARM_HTTP_TOKEN", "t0ken")
    config, _, _ = daemon_config("--data-dir", str(data_dir))
    assert config.swarm_key is not None  # read from swarm.key, relative to the file
    assert config.http is not None and config.http.token == "t0ken"
    assert not config.http_fallback  # the port is given now: busy would be an error
    assert config.grpc is not None and config.grpc.token == "t0ken" and not config.grpc_fallback
    assert (config.max_queue, config.shutdown_grace_s, config.mdns) == (64, 10.0, True)


def test_flags_win_over_the_file_and_lists_add(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f"""
[node]
listen = ["/ip4/127.0.0.1/tcp/0"]
peers = ["{PEER_A}"]
max_queue = 5
grace = 1.5
mdns = false
dht = false
heartbeat = 2.0
cuda_probe = false
log_level = "DEBUG"
log_format = "json"

[http]
listen = "127.0.0.1:0"

[router]
strategy = "round-robin"

[[models]]
kind = "fake"
name = "echo"
"""
    )
    config, level, log_format = daemon_config("--config", str(path))
    assert config.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert config.peers == (PEER_A,)
    assert (config.max_queue, config.shutdown_grace_s) == (5, 1.5)
    assert (config.mdns, config.dht, config.probe_cuda) == (False, False, False)
    assert config.membership.heartbeat_s == 2.0
    assert (level, log_format) == ("DEBUG", "json")
    assert config.router.strategy is Strategy.ROUND_ROBIN
    assert config.http is not None and config.http.port == 0 and not config.http_fallback

    config, level, log_format = daemon_config(
        *("--config", str(path), "--peer", PEER_B, "--max-queue", "7", "--mdns"),
        *("--strategy", "local-first", "--http", "off", "--model", "fake:other"),
        before=("--log-format", "text"),
    )
    assert config.peers == (PEER_A, PEER_B)  # repeatable flags add to the file's list
    assert config.max_queue == 7 and config.shutdown_grace_s == 1.5
    assert config.mdns and not config.dht
    assert config.router.strategy is Strategy.LOCAL_FIRST
    assert config.http is None
    assert model_names(config) == ["echo", "other"]
    assert (level, log_format) == ("DEBUG", "text")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("[node]\nmax_qeue = 3\n", "node: unknown field(s) max_qeue"),
        ("[http]\nport = 3\n", "http: unknown field(s) port"),
        ("[grpc]\nport = 3\n", "grpc: unknown field(s) port"),
        ("[nodes]\nlisten = []\n", "unknown table(s) nodes"),
        ("[node]\nmdns = 'no'\n", "node.mdns: expected true or false"),
        ("[node]\nlog_level = 'LOUD'\n", "node.log_level: expected one of"),
    ],
)
def test_unknown_or_mistyped_keys_are_refused_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, named: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as raised:
        daemon_config("--config", str(path))
    assert str(path) in str(raised.value) and named in str(raised.value)
    # Through main: bad usage (2), one line on stderr, no traceback, nothing started.
    assert cli.main(["daemon", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_the_data_dirs_config_is_read_without_config_flag(tmp_path: Path) -> None:
    (tmp_path / config_file.CONFIG_FILE).write_text(
        "[node]\nmax_queue = 3\n[http]\nlisten = 'off'\n"
    )
    config, _, _ = daemon_config("--data-dir", str(tmp_path))
    assert config.max_queue == 3 and config.http is None
    # A --config that does not exist is an error; a data dir without one is not.
    with pytest.raises(ConfigError, match="cannot read"):
        daemon_config("--config", str(tmp_path / "absent.toml"))
    assert daemon_config("--data-dir", str(tmp_path / "empty"))[0].max_queue == 64


def test_gateway_default_off_and_explicit(tmp_path: Path) -> None:
    config, _, _ = daemon_config("--data-dir", str(tmp_path))
    assert config.http is not None and config.http.port == 8470 and config.http_fallback
    config, _, _ = daemon_config("--data-dir", str(tmp_path), "--http", "127.0.0.1:8470")
    assert config.http is not None and not config.http_fallback  # given, so busy is an error
    assert daemon_config("--data-dir", str(tmp_path), "--http", "off")[0].http is None
    with pytest.raises(ConfigError, match="need the gateway on"):
        daemon_config("--data-dir", str(tmp_path), "--http", "off", "--http-insecure")
    with pytest.raises(ConfigError, match="beyond loopback"):
        daemon_config("--data-dir", str(tmp_path), "--http", "0.0.0.0:0")


def test_grpc_port_default_off_explicit_and_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_T", "h-token")
    monkeypatch.setenv("GRPC_T", "g-token")
    here = ("--data-dir", str(tmp_path))
    config, _, _ = daemon_config(*here)
    assert config.grpc is not None and config.grpc.port == 8471 and config.grpc_fallback
    assert config.grpc.token is None
    config, _, _ = daemon_config(*here, "--grpc", "127.0.0.1:9000")
    assert config.grpc is not None and config.grpc.port == 9000 and not config.grpc_fallback
    assert daemon_config(*here, "--grpc", "off")[0].grpc is None
    # The HTTP gateway's token guards the gRPC port too, unless it names its own.
    config, _, _ = daemon_config(*here, "--http-token-env", "HTTP_T")
    assert config.grpc is not None and config.grpc.token == "h-token"
    config, _, _ = daemon_config(*here, "--http-token-env", "HTTP_T", "--grpc-token-env", "GRPC_T")
    assert config.grpc is not None and config.grpc.token == "g-token"
    assert config.http is not None and config.http.token == "h-token"
    config, _, _ = daemon_config(*here, "--http", "off", "--http-token-env", "HTTP_T")
    assert config.http is None and config.grpc is not None and config.grpc.token == "h-token"
    with pytest.raises(ConfigError, match="need the gRPC port on"):
        daemon_config(*here, "--grpc", "off", "--grpc-insecure")
    with pytest.raises(ConfigError, match="need the gateway on"):
        daemon_config(*here, "--http", "off", "--grpc", "off", "--http-token-env", "HTTP_T")
    with pytest.raises(ConfigError, match=r"--grpc 0\.0\.0\.0: binding beyond loopback"):
        daemon_config(*here, "--grpc", "0.0.0.0:0")
    config, _, _ = daemon_config(*here, "--grpc", "0.0.0.0:0", "--grpc-insecure")
    assert config.grpc is not None and config.grpc.insecure
    path = tmp_path / "c.toml"
    path.write_text("[grpc]\nlisten = '[::1]:0'\ntoken_env = 'GRPC_T'\n")
    config, _, _ = daemon_config("--config", str(path))
    assert config.grpc is not None and (config.grpc.host, config.grpc.token) == ("::1", "g-token")


def test_keygen_and_id_and_init_speak_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "swarm.key"
    assert cli.main(["keygen", str(key), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"path", "fingerprint"}  # the shape scripts rely on (README: Operations)
    assert out["path"] == str(key.resolve())
    assert re.fullmatch(r"[0-9a-f]{16}", out["fingerprint"])
    secret = key.read_text().split()[-1]
    assert secret not in json.dumps(out)  # the key itself is never printed

    assert cli.main(["id", "--data-dir", str(tmp_path), "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert set(ids) == {"node", "client"} and ids["node"] != ids["client"]
    assert all(v.startswith("12D3KooW") for v in ids.values())

    assert cli.main(["init", "--data-dir", str(tmp_path), "--json"]) == 0
    wrote = json.loads(capsys.readouterr().out)
    assert set(wrote) == {"path", "bytes"}
    assert wrote["path"] == str((tmp_path / config_file.CONFIG_FILE).resolve())
    assert wrote["bytes"] == (tmp_path / config_file.CONFIG_FILE).stat().st_size


def test_the_verify_table_of_the_template_reads_as_the_defaults(tmp_path: Path) -> None:
    """Every `# key = value` line under [verify] in default_config.toml, switched on,
    is accepted and is the default; a typo there is refused like anywhere else."""
    from node.jobs.verify import VerifyConfig

    template = (Path(cli.__file__).parent / "default_config.toml").read_text()
    part = template[template.index("# [verify]") :]
    on = re.sub(r"^# ([a-z_]+ = )", r"\1", part.replace("# [verify]", "[verify]"), flags=re.M)
    path = tmp_path / "c.toml"
    path.write_text(on)
    config, _, _ = daemon_config("--config", str(path))
    assert config.verify == VerifyConfig()
    assert len(tomllib.loads(on)["verify"]) == 11  # every key is shown
    path.write_text("[verify]\nrate = 0.5\nmin_strikes = 4\n")
    config, _, _ = daemon_config("--config", str(path))
    assert (config.verify.rate, config.verify.policy.min_strikes) == (0.5, 4)
    for bad, named in (("rat = 0.1", "unknown field(s) rat"), ("rate = 2", "verify.rate")):
        path.write_text(f"[verify]\n{bad}\n")
        with pytest.raises(ConfigError, match=re.escape(named)):
            daemon_config("--config", str(path))


def test_relay_service_flag_and_the_relay_table(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / config_file.CONFIG_FILE).write_text(
        '[node]\nreachability = "public"\n\n[relay]\ncircuit_bytes = 1000\nreservations = 3\n'
    )
    config, _, _ = daemon_config("--data-dir", str(data_dir))
    assert config.reach.mode == "public"
    assert config.relay_service.enabled
    assert (config.relay_service.circuit_bytes, config.relay_service.reservations) == (1000, 3)
    config, _, _ = daemon_config(
        "--data-dir", str(data_dir), "--relay-service", "off", "--reachability", "private"
    )
    assert not config.relay_service.enabled and config.relay_service.circuit_bytes == 1000
    assert config.reach.mode == "private"
    (data_dir / config_file.CONFIG_FILE).write_text("[relay]\ncircuit_byte = 1000\n")
    with pytest.raises(ConfigError, match="circuit_byte"):
        daemon_config("--data-dir", str(data_dir))
