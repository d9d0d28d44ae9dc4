"""The ``swarm`` command: daemon, submit, status.

Flags are parsed once here into typed configs; nothing below reads argv or env.
Exit codes: 0 done, 1 the request failed (typed error printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import trio

from protocols import Chunk, Priority, RemoteError, SwarmError, Value
from runners.catalog import (
    DEFAULT_MODEL,
    ModelSpec,
    ModelSpecError,
    parse_model_spec,
    specs_from_config,
)
from runners.errors import ConfigError as RunnerConfigError
from runners.settings import Table

from . import logs
from .access import load_allow_list, load_swarm_key, new_swarm_key_text
from .client import SwarmClient
from .daemon import DEFAULT_DATA_DIR, DEFAULT_LISTEN, Node, NodeConfig, read_state
from .errors import ConfigError, sole_error
from .gateway import GatewayConfig
from .host import build_host, load_or_create_identity
from .membership import MembershipConfig
from .render import (
    jsonable,
    model_rows,
    models_text,
    peers_text,
    result_json,
    result_text,
    status_text,
)
from .router import RouterConfig, Strategy

log = logging.getLogger("swarm")
CONFIG_FILE = "config.toml"  # in the data dir: read when present, or named by --config
CLIENT_KEY = "client.key"  # the identity swarm submit/status/peers use


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure(
        args.log_level or ("INFO" if args.func is _daemon else "WARNING"),
        json_lines=args.log_format == "json",
    )
    try:
        # Commands that touch no network (keygen, id) are plain functions.
        run = trio.run if inspect.iscoroutinefunction(args.func) else (lambda f, a: f(a))
        code: int = run(args.func, args)
    except BaseException as raised:
        exc = sole_error(raised)  # a nursery wraps the error that ends it in a group
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, ConfigError):
            print(f"swarm: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, SwarmError):
            print(f"swarm: {type(exc).__name__} [{exc.code}]: {exc}", file=sys.stderr)
            return 1
        raise
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm", description="Peer-to-peer inference node.")
    p.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO for daemon, else WARNING)"
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line (with request_id) for log collectors",
    )
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    d = sub.add_parser("daemon", help="run a node")
    _data_dir(d)
    d.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help=f"address to listen on (repeatable; default {DEFAULT_LISTEN})",
    )
    d.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a peer to dial and forward to (repeatable)",
    )
    d.add_argument(
        "--model",
        action="append",
        metavar="SPEC",
        help=(
            "a model to serve (repeatable): all-minilm-l6-v2 (the default), efficientnet-lite0, "
            "fake:NAME[:LATENCY_MS], or KIND:key=value,... (see README: Models)"
        ),
    )
    d.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=(
            f"[[models]], [backends.NAME] and [router] tables "
            f"(default DATA_DIR/{CONFIG_FILE} if present)"
        ),
    )
    d.add_argument("--no-models", action="store_true", help="serve nothing; only forward")
    d.add_argument(
        "--strategy",
        choices=[str(x) for x in Strategy],
        help="how this node picks where a job runs, unless the job says (default least-loaded)",
    )
    d.add_argument("--max-queue", type=int, default=64, help="waiting requests per model")
    d.add_argument("--grace", type=float, default=10.0, help="seconds to finish work at shutdown")
    d.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="join the swarm through this peer; also a DHT seed (repeatable)",
    )
    d.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN")
    d.add_argument("--no-dht", action="store_true", help="do not run the Kademlia DHT")
    d.add_argument(
        "--heartbeat",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often linked peers prove they are alive (default 5)",
    )
    d.add_argument(
        "--dead-after",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="drop a peer silent for this long (default 15)",
    )
    d.add_argument("--no-cuda-probe", action="store_true", help="skip importing torch for CUDA")
    d.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="only these peers may use this node (repeatable)",
    )
    d.add_argument(
        "--allow-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="allowed peer ids, one per line (repeatable)",
    )
    d.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible and KServe v2 HTTP gateway here (e.g. 127.0.0.1:8080)",
    )
    d.add_argument(
        "--http-token-env",
        metavar="VAR",
        help="the environment variable holding the gateway's bearer token",
    )
    d.add_argument(
        "--http-insecure",
        action="store_true",
        help="allow the gateway beyond loopback without a token",
    )
    d.set_defaults(func=_daemon)

    s = sub.add_parser("submit", help="submit a job and print its result")
    _data_dir(s)
    s.add_argument(
        "--peer",
        metavar="MULTIADDR",
        help="the node to submit to (default: the daemon running in --data-dir)",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("texts", nargs="*", metavar="INPUT", help="input text(s), sent as 'text'")
    s.add_argument(
        "--tensor",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="a tensor input from a .npy file (repeatable)",
    )
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model parameter; VALUE is parsed as JSON when it can be",
    )
    s.add_argument(
        "--input-name",
        default="text",
        metavar="NAME",
        help="the input the INPUT texts go to (default text; prompt for text generation)",
    )
    s.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    s.add_argument(
        "--strategy",
        choices=[str(x) for x in Strategy],
        help="how the node picks the peer that runs it (default: the node's)",
    )
    s.add_argument("--deadline", type=float, metavar="SECONDS", help="give up after this long")
    s.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_submit)

    k = sub.add_parser("keygen", help="write a new swarm key for a private swarm")
    k.add_argument("path", type=Path, metavar="FILE", help="where to write it (e.g. swarm.key)")
    k.set_defaults(func=_keygen)

    i = sub.add_parser("id", help="print this data dir's node and client peer ids")
    _data_dir(i)
    i.set_defaults(func=_id)

    st = sub.add_parser("status", help="show a node's hardware, models and load")
    _data_dir(st)
    st.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    mo = sub.add_parser("models", help="list the models a node and its peers serve")
    _data_dir(mo)
    mo.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    mo.add_argument("--json", action="store_true", help="machine-readable output")
    mo.set_defaults(func=_models_cmd)

    ini = sub.add_parser("init", help="write a commented config.toml into the data dir")
    _data_dir(ini)
    ini.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    ini.set_defaults(func=_init)

    pe = sub.add_parser("peers", help="list the peers a node knows")
    _data_dir(pe)
    pe.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    pe.add_argument("--model", metavar="NAME", help="only peers that serve this model")
    pe.add_argument("--json", action="store_true", help="machine-readable output")
    pe.set_defaults(func=_peers)

    mc = sub.add_parser("mcp", help="serve the node's MCP tools on stdin/stdout")
    mc.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the daemon's")
    mc.add_argument("--url", help="the daemon's HTTP gateway (default: from its daemon.json)")
    mc.add_argument("--http-token-env", metavar="VAR", help="the gateway's bearer token")
    mc.set_defaults(func=_mcp)
    return p


async def _mcp(args: argparse.Namespace) -> int:
    """MCP on stdio, forwarding to the running daemon's /mcp (see node/mcp/bridge.py)."""
    from .mcp import bridge  # the MCP SDK takes ~0.4 s to import: only this command pays

    token = os.environ.get(args.http_token_env) if args.http_token_env else None
    if args.http_token_env and not token:
        raise ConfigError(f"--http-token-env {args.http_token_env}: unset or empty")
    await bridge.serve_stdio(bridge.daemon_url(args.data_dir.expanduser(), args.url), token)
    return 0


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="join the private swarm of this key (default: DATA_DIR/swarm.key if it exists)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"identity, models and state (default {DEFAULT_DATA_DIR})",
    )


def _config_file(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """config.toml as data (empty when there is none), and where it was read."""
    path = args.config or args.data_dir.expanduser() / CONFIG_FILE
    if args.config is None and not path.exists():
        return {}, str(path)
    try:
        return tomllib.loads(path.read_text()), str(path)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _models(args: argparse.Namespace, config: dict[str, Any], source: str) -> tuple[ModelSpec, ...]:
    """The models of config.toml, then those of --model; the default if none.

    Every declaration is validated here, before anything starts: a typo is bad
    usage, said at once with the field it is in.
    """
    try:
        specs = specs_from_config(config, source) if config else []
        specs += [parse_model_spec(text) for text in args.model or ()]
        if not specs:
            specs.append(parse_model_spec(DEFAULT_MODEL))
    except ModelSpecError as exc:
        raise ConfigError(str(exc)) from exc
    names = [s.name.lower() for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"models declared twice: {', '.join(twice)}")
    return tuple(specs)


def _router(args: argparse.Namespace, config: dict[str, Any], source: str) -> RouterConfig:
    """config.toml's [router] table; --strategy overrides its strategy."""
    try:
        table = config.get("router")
        router = (
            RouterConfig()
            if table is None
            else RouterConfig.from_table(Table(table, f"{source}: router"))
        )
    except (RunnerConfigError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    if args.strategy is not None:
        router = dataclasses.replace(router, strategy=Strategy(args.strategy))
    return router


async def _daemon(args: argparse.Namespace) -> int:
    if args.no_models and args.model:
        raise ConfigError("--no-models and --model exclude each other")
    file, source = _config_file(args)
    unknown = sorted(set(file) - {"models", "backends", "router"})
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(unknown)}")
    models = () if args.no_models else _models(args, file, source)
    config = NodeConfig(
        data_dir=args.data_dir.expanduser(),
        listen=tuple(args.listen or [DEFAULT_LISTEN]),
        peers=tuple(args.peer),
        models=models,
        max_queue=args.max_queue,
        shutdown_grace_s=args.grace,
        probe_cuda=not args.no_cuda_probe,
        swarm_key=_swarm_key(args),
        bootstrap=tuple(args.bootstrap),
        mdns=not args.no_mdns,
        dht=not args.no_dht,
        membership=_membership(args),
        router=_router(args, file, source),
        allow=load_allow_list(args.allow, args.allow_file),
        http=_http(args),
    )
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        # Catch signals before saying "ready": a supervisor may send SIGTERM at once.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            print(f"swarm node {node.peer_id} ready", flush=True)
            for addr in node.addrs:
                print(f"  listening on {addr}", flush=True)
            serving = ", ".join(map(str, config.models)) or "no models (forwarding only)"
            print(f"  serving {serving}", flush=True)
            if node.gateway is not None:
                print(f"  HTTP gateway on {node.gateway.url}", flush=True)
            async for signum in signals:
                log.info("got %s", signal.Signals(signum).name)
                node.stop()
                break
    return 0


def _http(args: argparse.Namespace) -> GatewayConfig | None:
    if args.http is None:
        if args.http_token_env or args.http_insecure:
            raise ConfigError("--http-token-env and --http-insecure need --http HOST:PORT")
        return None
    return GatewayConfig.parse(
        args.http, token_env=args.http_token_env, insecure=args.http_insecure
    )


def _swarm_key(args: argparse.Namespace) -> str | None:
    path = args.swarm_key or args.data_dir.expanduser() / "swarm.key"
    if args.swarm_key is None and not path.exists():
        return None
    return load_swarm_key(path)


def _connect(args: argparse.Namespace, target: str) -> AbstractAsyncContextManager[SwarmClient]:
    """A client with this data dir's client identity and swarm key.

    Not the node's own identity: a peer connected to both the daemon and the CLI
    under one peer id would take one for the other (one connection per peer).
    """
    key_pair = load_or_create_identity(args.data_dir.expanduser() / CLIENT_KEY)
    return SwarmClient.connect(target, swarm_key=_swarm_key(args), key_pair=key_pair)


def _keygen(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.exists():
        raise ConfigError(f"{path} exists; not overwriting a swarm key")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(new_swarm_key_text())
    print(f"wrote a new swarm key to {path}; give it to every node of the swarm (--swarm-key)")
    return 0


def _init(args: argparse.Namespace) -> int:
    path = args.data_dir.expanduser() / CONFIG_FILE
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; not overwriting it (--force to replace)")
    template = resources.files("node").joinpath("default_config.toml").read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template)
    print(f"wrote {path}; edit it, then start `swarm daemon --data-dir {args.data_dir}`")
    return 0


async def _models_cmd(args: argparse.Namespace) -> int:
    async with _connect(args, _target(args)) as client:
        record = await client.record()
    rows = model_rows(record.body)
    if args.json:
        print(json.dumps({"peer_id": record.peer_id, "models": rows}, indent=2))
    else:
        print(models_text(rows))
    return 0


def _id(args: argparse.Namespace) -> int:
    data_dir = args.data_dir.expanduser()
    for what, name in (("node", "identity.key"), ("client", CLIENT_KEY)):
        key_pair = load_or_create_identity(data_dir / name)
        print(f"{build_host(key_pair).get_id().to_base58()}  {what}")
    return 0


def _target(args: argparse.Namespace) -> str:
    if args.peer:
        return str(args.peer)
    state = read_state(args.data_dir.expanduser())
    if state is None or not state.get("addrs"):
        raise ConfigError(
            f"no daemon is running with data dir {args.data_dir}; start one with "
            "'swarm daemon' or give --peer MULTIADDR"
        )
    return str(state["addrs"][0])


async def _submit(args: argparse.Namespace) -> int:
    inputs = _inputs(args)
    params = dict(_param(p) for p in args.param)
    on_chunk = _print_chunk(args.json) if args.stream else None
    async with _connect(args, _target(args)) as client:
        started = trio.current_time()
        try:
            result = await client.infer(
                args.model,
                inputs,
                params=params,
                priority=Priority.parse(args.priority),
                deadline_s=args.deadline,
                on_chunk=on_chunk,
                strategy=args.strategy,
            )
        except RemoteError as exc:
            if args.json:
                print(
                    json.dumps(
                        {
                            "error": {
                                "code": str(exc.code),
                                "message": exc.message,
                                "retry": exc.retry.value,
                                "retry_after_ms": exc.retry_after_ms,
                            }
                        }
                    )
                )
            else:
                print(
                    f"error {exc.code}: {exc.message} (retry: {exc.retry.value})", file=sys.stderr
                )
            return 1
    took_ms = round(1000 * (trio.current_time() - started), 3)
    result = replace(result, meta={**result.meta, "took_ms": took_ms})
    print(result_json(result) if args.json else result_text(result), flush=True)
    return 0


def _inputs(args: argparse.Namespace) -> dict[str, Value | np.ndarray[Any, Any]]:
    inputs: dict[str, Value | np.ndarray[Any, Any]] = {}
    if args.texts:
        texts = args.texts[0] if len(args.texts) == 1 else list(args.texts)
        inputs[args.input_name] = texts
    for spec in args.tensor:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"--tensor takes NAME=FILE.npy, not {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not inputs:
        raise ConfigError("give an INPUT text or a --tensor")
    return inputs


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param takes KEY=VALUE, not {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _print_chunk(as_json: bool) -> Any:
    async def on_chunk(chunk: Chunk) -> None:
        if as_json:
            print(json.dumps({"chunk": chunk.seq, "outputs": jsonable(chunk.outputs)}), flush=True)
            return
        for value in chunk.outputs.values():
            text = value if isinstance(value, str) else repr(value)
            print(text, end="" if isinstance(value, str) else "\n", flush=True)

    return on_chunk


async def _status(args: argparse.Namespace) -> int:
    try:
        target = _target(args)
    except ConfigError:
        if args.peer:
            raise
        return await _local_status(args)
    async with _connect(args, target) as client:
        record = await client.record()
    if args.json:
        print(
            json.dumps(
                {"peer_id": record.peer_id, "seq": record.seq, **jsonable(record.body)}, indent=2
            )
        )
    else:
        print(status_text(record.peer_id, record.body))
    return 0


async def _peers(args: argparse.Namespace) -> int:
    async with _connect(args, _target(args)) as client:
        record = await client.record()
    view = record.body.get("view", {})
    rows = view.get("peers", [])
    if args.model:
        wanted = args.model.lower()
        rows = [r for r in rows if wanted in [m.lower() for m in r.get("models", [])]]
    if args.json:
        print(json.dumps({"peer_id": record.peer_id, "peers": jsonable(rows)}, indent=2))
    else:
        print(peers_text(rows, view.get("discovery", {})))
    return 0


def _membership(args: argparse.Namespace) -> MembershipConfig:
    try:
        return MembershipConfig(heartbeat_s=args.heartbeat, dead_after_s=args.dead_after)
    except ValueError as exc:
        raise ConfigError(f"--heartbeat/--dead-after: {exc}") from exc


async def _local_status(args: argparse.Namespace) -> int:
    """No daemon to ask: show what this machine has, and say so."""
    from capabilities.hardware import probe

    hardware = await trio.to_thread.run_sync(probe)
    body: Mapping[str, Any] = {"hardware": hardware.describe(), "models": []}
    note = f"no daemon running with data dir {args.data_dir}; this machine:"
    if args.json:
        print(json.dumps({"daemon": None, **jsonable(body)}, indent=2))
    else:
        print(note)
        print(status_text("(not running)", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
