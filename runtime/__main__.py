"""``python -m runtime``: the KServe ServingRuntime form of the server.

    python -m runtime --model_name=NAME --model_dir=/mnt/models [--http_port 8080]
                      [--grpc_port 8081] [--host 0.0.0.0] [engine flags, e.g. --max-model-len 4096]

KServe's own flags (``--http_port``, ``--grpc_port``, ``--enable_grpc``, ``--max_threads``, ...)
are accepted as KServe defines them; every flag takes the dashed and the underscored spelling.
vLLM's manifest flags are accepted too (``--model``, ``--port``, ``-tp 1``, ...:
``runtime.compat_args``). The model answers to ``--model_name`` (default: the first
``--served-model-name``, else ``--model`` as vLLM names it, else KServe's "model") and to every
``--served-model-name`` in every API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime._kserve import model_server
from runtime.args import GRACE_HELP, add_engine_args, non_negative_int, normalize_argv
from runtime.compat_args import add_vllm_compat_args, apply_vllm_compat


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", parents=[model_server.parser],
                                     description="vlmserve's KServe model server")
    parser.add_argument("--model_dir", default="/mnt/models",
                        help="the model folder (KServe's storage initializer puts it at /mnt/models)")
    parser.add_argument("--host", default="0.0.0.0", help="address the HTTP and gRPC servers bind (default: 0.0.0.0)")
    parser.add_argument("--graceful_shutdown_timeout", "--graceful-shutdown-timeout", type=non_negative_int,
                        default=30, metavar="S", help=GRACE_HELP)
    parser.add_argument("--port", dest="http_port", type=int, help="the HTTP port (vLLM's name for --http_port)")
    add_engine_args(parser)
    add_vllm_compat_args(parser, ssl=False)  # KServe's --ssl_keyfile / --ssl_certfile take the dashed spelling
    parser.set_defaults(model_name=None)  # None: not given (see parse_args)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (either spelling of every flag) and settle the model folder and name."""
    ns = parser.parse_args(normalize_argv(argv, parser))
    apply_vllm_compat(ns, parser)
    if ns.vllm_model is not None:
        ns.model_dir = ns.vllm_model
    if ns.model_name is None:
        ns.model_name = (ns.served_model_name or [ns.vllm_model or "model"])[0]
    return ns


def main(argv: list[str] | None = None) -> int:
    from runtime.serve import launch
    from runtime.server import ServerConfig

    parser = build_parser()
    ns = parse_args(parser, sys.argv[1:] if argv is None else argv)
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
        uvicorn_log_level=ns.uvicorn_log_level, root_path=ns.root_path, allowed_origins=ns.allowed_origins,
        kserve_args={k: getattr(ns, k) for k in vars(model_server.parser.parse_args([]))},
        command=[sys.executable, "-m", "runtime", *(sys.argv[1:] if argv is None else argv)],
    )
    return launch(ns, ns.model_name, config)


if __name__ == "__main__":
    sys.exit(main())
