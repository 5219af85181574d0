"""``python -m runtime``: the KServe ServingRuntime form of the server.

    python -m runtime --model_name=NAME --model_dir=/mnt/models [--http_port 8080]
                      [--grpc_port 8081] [--host 0.0.0.0] [engine flags, e.g. --max-model-len 4096]

KServe's own flags (``--http_port``, ``--grpc_port``, ``--enable_grpc``, ``--max_threads``, ...)
are accepted as KServe defines them; engine flags take vLLM's dashed or underscored spelling.
The model answers to ``--model_name`` (and any ``--served-model-name``) in every API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime._kserve import model_server
from runtime.args import GRACE_HELP, add_engine_args, non_negative_int, normalize_argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", parents=[model_server.parser],
                                     description="vlmserve's KServe model server")
    parser.add_argument("--model_dir", default="/mnt/models",
                        help="the model folder (KServe's storage initializer puts it at /mnt/models)")
    parser.add_argument("--host", default="0.0.0.0", help="address the HTTP and gRPC servers bind (default: 0.0.0.0)")
    parser.add_argument("--graceful_shutdown_timeout", "--graceful-shutdown-timeout", type=non_negative_int,
                        default=30, metavar="S", help=GRACE_HELP)
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from runtime.serve import launch
    from runtime.server import ServerConfig

    parser = build_parser()
    ns = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv, parser))
    if ns.workers != 1:
        parser.error("--workers: only 1 is supported (the engine runs in its own process)")
    model_server.args = ns  # what KServe's ModelServer reads (logging, predictor settings)
    ns.model = ns.model_dir
    from runtime.demo_vlm import DEMO_MODEL_NAME

    if ns.model_name == DEMO_MODEL_NAME and not Path(ns.model_dir).exists():
        ns.model = DEMO_MODEL_NAME  # no model mounted: the bundled demo (engine.loader resolves the name)
    config = ServerConfig(
        host=ns.host, http_port=ns.http_port, grpc_port=ns.grpc_port, enable_grpc=ns.enable_grpc,
        grace_period=ns.graceful_shutdown_timeout, max_threads=ns.max_threads,
        timeout_keep_alive=ns.timeout_keep_alive, access_log_format=ns.access_log_format,
        ssl_certfile=ns.ssl_certfile, ssl_keyfile=ns.ssl_keyfile,
        kserve_args={k: getattr(ns, k) for k in vars(model_server.parser.parse_args([]))},
        command=[sys.executable, "-m", "runtime", *(sys.argv[1:] if argv is None else argv)],
    )
    return launch(ns, ns.model_name, config)


if __name__ == "__main__":
    sys.exit(main())
