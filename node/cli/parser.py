"""The ``swarm`` command's flags, built with the standard library alone.

``swarm --help`` (and a typo's usage message) costs what this module imports:
argparse and two modules of constants. The commands import what they use when
they run (``node.cli.main``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node.data_dir import CONFIG_FILE, DEFAULT_DATA_DIR
from node.defaults import DEFAULT_GRPC, DEFAULT_HTTP, DEFAULT_LISTEN, REACHABILITY, STRATEGIES


def build() -> argparse.ArgumentParser:
    """Every command's flags; ``command`` names the one given."""
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
            f"Run a node. Every flag can be set in DATA_DIR/{CONFIG_FILE} "
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
            f"[node], [http], [grpc], [[models]], [backends.NAME], [router] and [fairness] tables "
            f"(default DATA_DIR/{CONFIG_FILE} if present)"
        ),
    )
    d.add_argument(
        "--no-models", action="store_true", default=None, help="serve nothing; only forward"
    )
    d.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="how this node picks where a job runs, unless the job says (default least-loaded)",
    )
    d.add_argument(
        "--max-queue", type=int, metavar="N", help="waiting requests per model (default 64)"
    )
    d.add_argument(
        "--upload-rate",
        type=float,
        metavar="BYTES_PER_S",
        help="bytes a second this node sends of shared models, all peers together (0, the "
        "default: no cap)",
    )
    d.add_argument(
        "--max-uploads",
        type=int,
        metavar="N",
        help="peers pulling shared models from this node at once (default 8)",
    )
    d.add_argument(
        "--chunk-size",
        type=int,
        metavar="BYTES",
        help="chunk size of the manifests this node makes of its models (default 1048576)",
    )
    d.add_argument(
        "--fair-share",
        action=argparse.BooleanOptionalAction,
        help="share capacity fairly between the peers sending work (default on; off: first "
        "come, first served); limits per peer in the [fairness] table",
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
        "--reachability",
        choices=REACHABILITY,
        help="whether peers can dial this node: learnt from peers that dial it back "
        "(auto, the default), or said; private announces relayed addresses only",
    )
    d.add_argument(
        "--public-addr",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="an address that reaches this node from anywhere (a port forwarded on the "
        "router), announced as given; implies public (repeatable)",
    )
    d.add_argument(
        "--relay-service",
        choices=["on", "off"],
        help="relay circuits for NATed peers while this node is publicly reachable (default on)",
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
            f"{DEFAULT_HTTP}, or a free port on 127.0.0.1 when that one is "
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
    d.add_argument(
        "--grpc",
        metavar="HOST:PORT|off",
        help=(
            f"serve KServe v2 over gRPC here (default {DEFAULT_GRPC}, or a free port on "
            "127.0.0.1 when that one is busy; off: none)"
        ),
    )
    d.add_argument(
        "--grpc-token-env",
        metavar="VAR",
        help="the variable holding the gRPC port's bearer token (default: --http-token-env's)",
    )
    d.add_argument(
        "--grpc-insecure",
        action="store_true",
        default=None,
        help="allow the gRPC port beyond loopback without a token",
    )
    d.set_defaults(command="daemon")

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
        choices=STRATEGIES,
        help="how the node picks the peer that runs it (default: the node's)",
    )
    s.add_argument("--deadline", type=float, metavar="SECONDS", help="give up after this long")
    s.add_argument(
        "--verify",
        type=int,
        default=0,
        choices=range(0, 5),
        metavar="N",
        help="run it on N more nodes (up to 4) and say whether the answers agree",
    )
    s.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    _json_flag(s)
    s.set_defaults(command="submit")

    k = sub.add_parser("keygen", help="write a new swarm key for a private swarm")
    k.add_argument("path", type=Path, metavar="FILE", help="where to write it (e.g. swarm.key)")
    _json_flag(k)
    k.set_defaults(command="keygen")

    i = sub.add_parser("id", help="print this data dir's node and client peer ids")
    _data_dir(i)
    _json_flag(i)
    i.set_defaults(command="id")

    st = sub.add_parser("status", help="show a node's hardware, models and load")
    _data_dir(st)
    st.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    _json_flag(st)
    st.set_defaults(command="status")

    mo = sub.add_parser(
        "models",
        help="list the models a node and its peers serve (content ids, sizes, providers); "
        "pull NAME|CONTENT_ID from peers; share PATH",
    )
    mo.add_argument("action", nargs="?", choices=["list", "pull", "share"], default="list")
    mo.add_argument("target", nargs="?", help="pull: a model name or content id; share: a path")
    _data_dir(mo)
    mo.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    _json_flag(mo)
    mo.set_defaults(command="models")

    ini = sub.add_parser("init", help="write a commented config.toml into the data dir")
    _data_dir(ini)
    ini.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    _json_flag(ini)
    ini.set_defaults(command="init")

    pe = sub.add_parser("peers", help="list the peers a node knows")
    _data_dir(pe)
    pe.add_argument("--peer", metavar="MULTIADDR", help="ask this node instead of the local one")
    pe.add_argument("--model", metavar="NAME", help="only peers that serve this model")
    _json_flag(pe)
    pe.set_defaults(command="peers")

    mc = sub.add_parser("mcp", help="serve the node's MCP tools on stdin/stdout")
    mc.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the daemon's")
    mc.add_argument("--url", help="the daemon's HTTP gateway (default: from its daemon.json)")
    mc.add_argument("--http-token-env", metavar="VAR", help="the gateway's bearer token")
    mc.set_defaults(command="mcp")
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, for scripts")


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
