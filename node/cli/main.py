"""The ``swarm`` command: daemon, submit, status.

Flags are parsed once (``parser``) into typed configs; nothing below reads argv
or env. Exit codes: 0 done, 1 the request failed (typed error printed), 2 bad usage.

A command imports what it uses when it runs, not before: ``swarm --help``
costs argparse, and ``swarm submit`` to this machine's daemon, through its
local socket (``local_client``), costs trio and the wire, never libp2p. Only a
command that goes through libp2p (``--peer``, or a daemon without a socket)
imports it.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from node.data_dir import CLIENT_KEY, CONFIG_FILE, IDENTITY_KEY, read_state

from . import parser

if TYPE_CHECKING:
    import numpy as np
    from rich.console import RenderableType

    from node.client import SwarmClient
    from protocols import Chunk, Result, Value

    from .local_client import Client, Record

log = logging.getLogger("swarm")
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from node.errors import sole_error
    from node.observe import logs
    from protocols import SwarmError
    from protocols.errors import ConfigError

    try:
        if args.command == "daemon":
            from node import daemon  # noqa: F401  (libp2p first: logs.configure must follow it)

            from . import config_file

            # The daemon's config file may set the log level and format: read it first.
            args.node_config, level, log_format = config_file.node_config(args)
        else:
            level, log_format = args.log_level or "WARNING", args.log_format or "text"
        args.logs = (level, log_format)
        logs.configure(level, json_lines=log_format == "json")
        func = COMMANDS[args.command]
        # Commands that touch no network (keygen, id) are plain functions.
        if inspect.iscoroutinefunction(func):
            import trio

            code: int = trio.run(func, args)
        else:
            code = func(args)
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
    return parser.build()


async def _mcp(args: argparse.Namespace) -> int:
    """MCP on stdio, forwarding to the running daemon's /mcp (see node/mcp/bridge.py)."""
    from node.mcp import bridge  # the MCP SDK takes ~0.4 s to import: only this command pays
    from protocols.errors import ConfigError

    token = os.environ.get(args.http_token_env) if args.http_token_env else None
    if args.http_token_env and not token:
        raise ConfigError(f"--http-token-env {args.http_token_env}: unset or empty")
    await bridge.serve_stdio(bridge.daemon_url(args.data_dir.expanduser(), args.url), token)
    return 0


async def _daemon(args: argparse.Namespace) -> int:
    import trio

    from node.config import NodeConfig
    from node.daemon import Node

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
            if node.services.grpc is not None:
                print(f"  KServe v2 gRPC on {node.services.grpc.address}", flush=True)
            async for signum in signals:
                log.info("got %s", signal.Signals(signum).name)
                node.stop()
                break
    return 0


# --- reaching a node ---------------------------------------------------------------------


async def _with_client(args: argparse.Namespace, use: Callable[[Client], Awaitable[T]]) -> T:
    """``use`` a client of the node the command asks: ``--peer`` over libp2p; else the
    daemon of ``--data-dir``, on its local socket when it answers, else over libp2p.

    Raises ConfigError when there is no daemon to ask.
    """
    if args.peer:
        return await _over_libp2p(args, str(args.peer), use)
    state = _daemon_state(args)
    if state.get("socket"):
        from node.errors import PeerUnavailable

        from .local_client import LocalClient

        path = Path(state["socket"])
        async with LocalClient.connect(path, peer_id=str(state.get("peer_id"))) as client:
            try:
                return await use(client)
            except PeerUnavailable as exc:  # nothing was sent: libp2p is safe to try
                log.info("the daemon's socket does not answer (%s); trying libp2p", exc)
    return await _over_libp2p(args, str(state["addrs"][0]), use)


async def _over_libp2p(
    args: argparse.Namespace, target: str, use: Callable[[Client], Awaitable[T]]
) -> T:
    async with _connect(args, target) as client:
        return await use(client)


@contextlib.asynccontextmanager
async def _connect(args: argparse.Namespace, target: str) -> AsyncIterator[SwarmClient]:
    """A libp2p client with this data dir's client identity and swarm key.

    Not the node's own identity: a peer connected to both the daemon and the CLI
    under one peer id would take one for the other (one connection per peer).
    """
    from node.client import SwarmClient
    from node.net.host import load_or_create_identity
    from node.observe import logs

    from . import config_file

    level, log_format = args.logs
    logs.configure(level, json_lines=log_format == "json")  # again, now that libp2p is in
    key_pair = load_or_create_identity(args.data_dir.expanduser() / CLIENT_KEY)
    swarm_key = config_file.swarm_key_or_default(args.swarm_key, args.data_dir)
    async with SwarmClient.connect(target, swarm_key=swarm_key, key_pair=key_pair) as client:
        yield client


def _daemon_state(args: argparse.Namespace) -> dict[str, Any]:
    """daemon.json of ``--data-dir``'s running daemon; ConfigError when none runs."""
    from protocols.errors import ConfigError

    state = read_state(args.data_dir.expanduser())
    if state is None or not state.get("addrs"):
        raise ConfigError(
            f"no daemon is running with data dir {args.data_dir}; start one with "
            "'swarm daemon' or give --peer MULTIADDR"
        )
    return state


async def _record(args: argparse.Namespace) -> Record:
    async def ask(client: Client) -> Record:
        return await client.record()

    return await _with_client(args, ask)


# --- commands ----------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from node.net.access import key_fingerprint, load_swarm_key, new_swarm_key_text
    from protocols.errors import ConfigError

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
    from importlib import resources

    from protocols.errors import ConfigError

    path = args.data_dir.expanduser() / CONFIG_FILE
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


def _id(args: argparse.Namespace) -> int:
    from node.net.host import load_or_create_identity, peer_id_of

    data_dir = args.data_dir.expanduser()
    ids = {}
    for what, name in (("node", IDENTITY_KEY), ("client", CLIENT_KEY)):
        ids[what] = peer_id_of(load_or_create_identity(data_dir / name))
    if args.json:
        _print_json(ids)
    else:
        for what, peer_id in ids.items():
            print(f"{peer_id}  {what}")
    return 0


async def _submit(args: argparse.Namespace) -> int:
    import trio

    from protocols import Priority, RemoteError

    inputs = _inputs(args)
    params = dict(_param(p) for p in args.param)
    on_chunk = _print_chunk(args.json) if args.stream else None

    async def run(client: Client) -> tuple[Result, float]:
        started = trio.current_time()
        result = await client.infer(
            args.model,
            inputs,
            params=params,
            priority=Priority.parse(args.priority),
            deadline_s=args.deadline,
            on_chunk=on_chunk,
            strategy=args.strategy,
            verify=args.verify,
        )
        return result, trio.current_time() - started

    try:
        result, took_s = await _with_client(args, run)
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
            print(f"error {exc.code}: {exc.message} (retry: {exc.retry.value})", file=sys.stderr)
        return 1
    from dataclasses import replace

    from .results import result_json, result_text  # not .render: no rich for a result

    result = replace(result, meta={**result.meta, "took_ms": round(1000 * took_s, 3)})
    print(result_json(result) if args.json else result_text(result), flush=True)
    return 0


def _inputs(args: argparse.Namespace) -> dict[str, Value | np.ndarray[Any, Any]]:
    from protocols.errors import ConfigError

    inputs: dict[str, Value | np.ndarray[Any, Any]] = {}
    if args.texts:
        texts = args.texts[0] if len(args.texts) == 1 else list(args.texts)
        inputs[args.input_name] = texts
    for spec in args.tensor:
        import numpy as np

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
    from protocols.errors import ConfigError

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param takes KEY=VALUE, not {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _print_chunk(as_json: bool) -> Callable[[Chunk], Awaitable[None]]:
    from node.json_values import jsonable

    async def on_chunk(chunk: Chunk) -> None:
        if as_json:
            print(json.dumps({"chunk": chunk.seq, "outputs": jsonable(chunk.outputs)}), flush=True)
            return
        for key, value in chunk.outputs.items():
            if key == "tokens":  # a generation chunk's count of its tokens: not its text
                continue
            text = value if isinstance(value, str) else repr(value)
            print(text, end="" if isinstance(value, str) else "\n", flush=True)

    return on_chunk


async def _status(args: argparse.Namespace) -> int:
    from protocols.errors import ConfigError

    from .render import status_table

    if not args.peer:
        try:
            _daemon_state(args)
        except ConfigError:
            return await _local_status(args)
    # The gateway's URL is this machine's business: known for the local daemon only.
    state = None if args.peer else read_state(args.data_dir.expanduser())
    gateway = state.get("http") if state else None
    record = await _record(args)
    if args.json:
        _print_json(
            {"peer_id": record.peer_id, "seq": record.seq, "gateway": gateway, **record.body}
        )
    else:
        _show(status_table(record.peer_id, record.body, gateway))
    return 0


async def _peers(args: argparse.Namespace) -> int:
    from .render import peers_table

    record = await _record(args)
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


async def _models_cmd(args: argparse.Namespace) -> int:
    from protocols.errors import ConfigError

    from .render import model_rows, models_table

    if args.action != "list" and not args.target:
        raise ConfigError(f"swarm models {args.action} needs a target")
    if args.action == "share":
        from .content_cmds import share

        shared = await share(args)
        _print_json(shared) if args.json else print(f"{shared['content']}  {shared['path']}")
        return 0
    record = await _record(args)
    if args.action == "pull":
        from .content_cmds import pull

        pulled = await pull(args, record.body, args.json)
        _print_json(pulled) if args.json else print(f"{pulled['content']}  {pulled['path']}")
        return 0
    rows = model_rows(record.body)
    if args.json:
        _print_json({"peer_id": record.peer_id, "models": rows})
    else:
        _show(models_table(rows))
    return 0


async def _local_status(args: argparse.Namespace) -> int:
    """No daemon to ask: show what this machine has, and say so."""
    import trio

    from capabilities.hardware import probe

    from .render import status_table

    hardware = await trio.to_thread.run_sync(probe)
    body: Mapping[str, Any] = {"hardware": hardware.describe(), "models": []}
    note = f"no daemon running with data dir {args.data_dir}; this machine:"
    if args.json:
        _print_json({"daemon": None, "gateway": None, **body})
    else:
        print(note)
        _show(status_table("(not running)", body))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "daemon": _daemon,
    "submit": _submit,
    "keygen": _keygen,
    "id": _id,
    "status": _status,
    "models": _models_cmd,
    "init": _init,
    "peers": _peers,
    "mcp": _mcp,
}


# --- output ------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    """One indented JSON document; keys in the order the command built them."""
    from node.json_values import jsonable

    print(json.dumps(jsonable(data), indent=2), flush=True)


def _show(renderable: RenderableType) -> None:
    """Print a table: coloured on a terminal, plain text (80 columns) when piped."""
    from .render import plain_console, to_text

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
    from rich.console import Console

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


if __name__ == "__main__":
    sys.exit(main())
