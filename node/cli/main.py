"""The ``swarm`` command: daemon, submit, status.

Flags are parsed once here into typed configs; nothing below reads argv or env.
Exit codes: 0 done, 1 the request failed (typed error printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio
from rich.console import Console, RenderableType

from node.client import SwarmClient
from node.config import DEFAULT_LISTEN, NodeConfig
from node.daemon import Node
from node.data_dir import DEFAULT_DATA_DIR, read_state
from node.errors import sole_error
from node.jobs.router import Strategy
from node.json_values import jsonable
from node.net.access import key_fingerprint, load_swarm_key, new_swarm_key_text
from node.net.host import build_host, load_or_create_identity
from node.observe import logs
from protocols import Chunk, Priority, RemoteError, SwarmError, Value
from protocols.errors import ConfigError

from . import config_file
from .render import (
    model_rows,
    models_table,
    peers_table,
    plain_console,
    result_json,
    result_text,
    status_table,
    to_text,
)

log = logging.getLogger("swarm")
T = TypeVar("T")
CLIENT_KEY = "client.key"  # the identity swarm submit/status/peers use


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.func is _daemon:
            # The daemon's config file may set the log level and format: read it first.
            args.node_config, level, log_format = config_file.node_config(args)
        else:
            level, log_format = args.log_level or "WARNING", args.log_format or "text"
        logs.configure(level, json_lines=log_format == "json")
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
        help="text lines (the default), or one JSON object per line (with request_id) for "
        "log collectors",
    )
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    d = sub.add_parser(
        "daemon",
        help="run a node",
        description=(
            f"Run a node. Every flag can be set in DATA_DIR/{config_file.CONFIG_FILE} "
            "('swarm init' writes one listing them all); a flag given here wins, and the "
            "repeatable ones add to the file's lists."
        ),
    )
    _data_dir(d)
    d.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help=f"address to listen on (repeatable; replaces the file's; default {DEFAULT_LISTEN})",
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
            f"[node], [http], [[models]], [backends.NAME] and [router] tables "
            f"(default DATA_DIR/{config_file.CONFIG_FILE} if present)"
        ),
    )
    d.add_argument(
        "--no-models", action="store_true", default=None, help="serve nothing; only forward"
    )
    d.add_argument(
        "--strategy",
        choices=[str(x) for x in Strategy],
        help="how this node picks where a job runs, unless the job says (default least-loaded)",
    )
    d.add_argument(
        "--max-queue", type=int, metavar="N", help="waiting requests per model (default 64)"
    )
    d.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="seconds to finish work at shutdown (default 10)",
    )
    d.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="join the swarm through this peer; also a DHT seed (repeatable)",
    )
    d.add_argument(
        "--mdns",
        action=argparse.BooleanOptionalAction,
        help="look for peers on the LAN (default on)",
    )
    d.add_argument(
        "--dht", action=argparse.BooleanOptionalAction, help="run the Kademlia DHT (default on)"
    )
    d.add_argument(
        "--heartbeat",
        type=float,
        metavar="SECONDS",
        help="how often linked peers prove they are alive (default 5)",
    )
    d.add_argument(
        "--dead-after",
        type=float,
        metavar="SECONDS",
        help="drop a peer silent for this long (default 15)",
    )
    d.add_argument(
        "--cuda-probe",
        action=argparse.BooleanOptionalAction,
        help="import torch at start to find CUDA devices (default on)",
    )
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
        metavar="HOST:PORT|off",
        help=(
            "serve the OpenAI-compatible and KServe v2 HTTP gateway here (default "
            f"{config_file.DEFAULT_HTTP}, or a free port on 127.0.0.1 when that one is "
            "busy; off: none)"
        ),
    )
    d.add_argument(
        "--http-token-env",
        metavar="VAR",
        help="the environment variable holding the gateway's bearer token",
    )
    d.add_argument(
        "--http-insecure",
        action="store_true",
        default=None,
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
    _json_flag(s)
    s.set_defaults(func=_submit)

    k = sub.add_parser("keygen", help="write a new swarm key for a private swarm")
    k.add_argument("path", type=Path, metavar="FILE", help="where to write it (e.g. swarm.key)")
    _json_flag(k)
    k.set_defaults(func=_keygen)

    i = sub.add_parser("id", help="print this data dir's node and client peer ids")
    _data_dir(i)
    _json_flag(i)
    i.set_defaults(func=_id)

    st = sub.add_parser("status", help="show a node's hardware, models and load")
    _data_dir(st)
    st.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    _json_flag(st)
    st.set_defaults(func=_status)

    mo = sub.add_parser("models", help="list the models a node and its peers serve")
    _data_dir(mo)
    mo.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    _json_flag(mo)
    mo.set_defaults(func=_models_cmd)

    ini = sub.add_parser("init", help="write a commented config.toml into the data dir")
    _data_dir(ini)
    ini.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    _json_flag(ini)
    ini.set_defaults(func=_init)

    pe = sub.add_parser("peers", help="list the peers a node knows")
    _data_dir(pe)
    pe.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    pe.add_argument("--model", metavar="NAME", help="only peers that serve this model")
    _json_flag(pe)
    pe.set_defaults(func=_peers)

    mc = sub.add_parser("mcp", help="serve the node's MCP tools on stdin/stdout")
    mc.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the daemon's")
    mc.add_argument("--url", help="the daemon's HTTP gateway (default: from its daemon.json)")
    mc.add_argument("--http-token-env", metavar="VAR", help="the gateway's bearer token")
    mc.set_defaults(func=_mcp)
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, for scripts")


async def _mcp(args: argparse.Namespace) -> int:
    """MCP on stdio, forwarding to the running daemon's /mcp (see node/mcp/bridge.py)."""
    from node.mcp import bridge  # the MCP SDK takes ~0.4 s to import: only this command pays

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


async def _daemon(args: argparse.Namespace) -> int:
    config: NodeConfig = args.node_config
    node = Node(config)
    async with trio.open_nursery() as nursery:
        with _progress(f"starting the node in {config.data_dir} (first run converts models)"):
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


def _swarm_key(args: argparse.Namespace) -> str | None:
    return config_file.swarm_key_or_default(args.swarm_key, args.data_dir)


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
    # The fingerprint tells two keys apart without showing either; the key stays in the file.
    fingerprint = key_fingerprint(load_swarm_key(path))
    if args.json:
        _print_json({"path": str(path.resolve()), "fingerprint": fingerprint})
    else:
        print(
            f"wrote a new swarm key to {path} (fingerprint {fingerprint}); "
            "give it to every node of the swarm (--swarm-key)"
        )
    return 0


def _init(args: argparse.Namespace) -> int:
    path = args.data_dir.expanduser() / config_file.CONFIG_FILE
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; not overwriting it (--force to replace)")
    template = resources.files("node.cli").joinpath("default_config.toml").read_text()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(template)
    if args.json:
        _print_json({"path": str(path.resolve()), "bytes": len(template.encode())})
    else:
        print(f"wrote {path}; edit it, then start `swarm daemon --data-dir {args.data_dir}`")
    return 0


def _print_json(data: Any) -> None:
    """One indented JSON document; keys in the order the command built them."""
    print(json.dumps(jsonable(data), indent=2), flush=True)


def _show(renderable: RenderableType) -> None:
    """Print a table: coloured on a terminal, plain text (80 columns) when piped."""
    console = plain_console()
    if console.is_terminal:
        console.print(renderable)
    else:  # without rich's padding to the full width: trailing blanks upset scripts
        print(to_text(renderable, console.width), flush=True)


@contextlib.contextmanager
def _progress(message: str) -> Iterator[None]:
    """A spinner on stderr while ``message`` is under way, when stderr is a terminal.

    Logs still say what happens (conversions, with their times); the spinner
    only shows that the command has not hung.
    """
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    # Log lines go through the console while the spinner runs, so each lands above
    # it whole instead of being drawn over: rich swaps sys.stderr for a proxy.
    stderr = sys.stderr
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is stderr
    ]
    with console.status(message):
        for handler in handlers:
            handler.setStream(sys.stderr)
        try:
            yield
        finally:
            for handler in handlers:
                handler.setStream(stderr)


async def _models_cmd(args: argparse.Namespace) -> int:
    async with _connect(args, _target(args)) as client:
        record = await client.record()
    rows = model_rows(record.body)
    if args.json:
        _print_json({"peer_id": record.peer_id, "models": rows})
    else:
        _show(models_table(rows))
    return 0


def _id(args: argparse.Namespace) -> int:
    data_dir = args.data_dir.expanduser()
    ids = {}
    for what, name in (("node", "identity.key"), ("client", CLIENT_KEY)):
        key_pair = load_or_create_identity(data_dir / name)
        ids[what] = build_host(key_pair).get_id().to_base58()
    if args.json:
        _print_json(ids)
    else:
        for what, peer_id in ids.items():
            print(f"{peer_id}  {what}")
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
    # The gateway's URL is this machine's business: known for the local daemon only.
    state = None if args.peer else read_state(args.data_dir.expanduser())
    gateway = state.get("http") if state else None
    async with _connect(args, target) as client:
        record = await client.record()
    if args.json:
        _print_json(
            {"peer_id": record.peer_id, "seq": record.seq, "gateway": gateway, **record.body}
        )
    else:
        _show(status_table(record.peer_id, record.body, gateway))
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
        _print_json({"peer_id": record.peer_id, "peers": rows})
    else:
        _show(peers_table(rows, view.get("discovery", {})))
    return 0


async def _local_status(args: argparse.Namespace) -> int:
    """No daemon to ask: show what this machine has, and say so."""
    from capabilities.hardware import probe

    hardware = await trio.to_thread.run_sync(probe)
    body: Mapping[str, Any] = {"hardware": hardware.describe(), "models": []}
    note = f"no daemon running with data dir {args.data_dir}; this machine:"
    if args.json:
        _print_json({"daemon": None, "gateway": None, **body})
    else:
        print(note)
        _show(status_table("(not running)", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
