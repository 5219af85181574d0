"""Entry points of the server, for both command lines.

* ``vlmserve serve [MODEL] --host H --port 8000 --grpc-port 8081 [engine flags]`` — the lead's
  CLI calls ``add_serve_args(parser)`` on its ``serve`` sub-parser and ``run_serve(ns)``.
* ``python -m runtime --model_name=NAME --model_dir=/mnt/models [--http_port 8080] ...`` — the
  KServe ServingRuntime form (``runtime.__main__``), which calls ``launch`` with KServe's flags.

Both validate the flags and the model folder before binding any port (exit code 2 on a bad
flag or model), then run ``runtime.server.serve`` (0 after SIGTERM/SIGINT, 1 on a fatal error).
"""

from __future__ import annotations

import argparse
import logging
import sys

from runtime.args import GRACE_HELP, add_engine_args, engine_args_from, frontend_args_from, non_negative_int
from runtime.compat_args import add_vllm_compat_args

logger = logging.getLogger("vlmserve.serve")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``vlmserve serve``: MODEL, where to listen, and the engine/front-end flags."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a local model folder or a Hugging Face hub id (default: the demo model)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--grpc-port", type=int, default=8081, help="gRPC (KServe v2) port (default: 8081)")
    parser.add_argument("--disable-grpc", action="store_true", help="do not start the gRPC server")
    parser.add_argument("--graceful-shutdown-timeout", type=non_negative_int, default=30, metavar="S",
                        help=GRACE_HELP)
    add_engine_args(parser)
    add_vllm_compat_args(parser)
    return parser


def launch(ns: argparse.Namespace, model_name: str, config) -> int:
    """Validate, build the model and serve it. ``ns.model`` is the model folder or hub id."""
    from runtime.server import build_model, check_engine_args, serve

    try:
        engine_args = engine_args_from(ns)
        frontend = frontend_args_from(ns)
        check_engine_args(engine_args)
    except (ValueError, OSError) as exc:
        print(f"vlmserve: error: {exc}", file=sys.stderr)
        return 2
    config.api_key = frontend.api_key
    config.max_body_bytes = frontend.max_request_body_bytes
    config.body_timeout = frontend.request_body_timeout
    from engine.core_process import name_process

    name_process("vlmserve-api")
    model = build_model(model_name, engine_args, frontend)
    from runtime.api_servers import attach_address

    core = attach_address()
    if core is not None:  # a copy started by the head (--api-server-count): share its engine core
        from engine.async_llm import AsyncLLM

        model._engine_factory = lambda args: AsyncLLM(args, attach=core)
        config.reuse_port = True
    else:
        config.api_server_count = frontend.api_server_count
    return serve(model, config)


def run_serve(ns: argparse.Namespace) -> int:
    """Run ``vlmserve serve`` from flags parsed with ``add_serve_args``; returns the exit code."""
    from runtime.server import ServerConfig

    if getattr(ns, "vllm_model", None) is not None:  # vLLM's --model, the same as MODEL
        if ns.model not in (None, ns.vllm_model):
            print(f"vlmserve serve: error: MODEL {ns.model} and --model {ns.vllm_model} differ", file=sys.stderr)
            return 2
        ns.model = ns.vllm_model
    if ns.model is None:
        from runtime.demo_vlm import DEMO_MODEL_NAME, demo_model_dir

        print(f"vlmserve: serving the demo model {DEMO_MODEL_NAME} ({demo_model_dir()}): a tiny VLM that knows "
              "only synthetic pictures of coloured shapes (see its README.md)", file=sys.stderr)
        # The name, not the path: the engine resolves it to the bundled checkpoint, and it is
        # the name the model answers to (v2 routes could not carry a path's slashes).
        ns.model = DEMO_MODEL_NAME
    names = ns.served_model_name or [ns.model]
    ns.served_model_name = names
    argv = sys.argv[1:]
    argv = argv[1:] if argv[:1] == ["serve"] else argv  # `vlmserve serve ...` or `python -m runtime.serve ...`
    config = ServerConfig(host=ns.host, http_port=ns.port, grpc_port=ns.grpc_port, enable_grpc=not ns.disable_grpc,
                          grace_period=ns.graceful_shutdown_timeout, ssl_certfile=ns.ssl_certfile,
                          ssl_keyfile=ns.ssl_keyfile, uvicorn_log_level=ns.uvicorn_log_level, root_path=ns.root_path,
                          allowed_origins=ns.allowed_origins,
                          command=[sys.executable, "-m", "runtime.serve", *argv])
    return launch(ns, names[0], config)


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.serve [MODEL] ...`` (the same as ``vlmserve serve``)."""
    from runtime.args import normalize_argv
    from runtime.compat_args import apply_vllm_compat

    parser = add_serve_args(argparse.ArgumentParser(prog="vlmserve serve"))
    ns = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv, parser))
    apply_vllm_compat(ns, parser)
    return run_serve(ns)


if __name__ == "__main__":
    sys.exit(main())
