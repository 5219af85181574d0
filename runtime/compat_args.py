"""vLLM's flags that deployment manifests carry, accepted by both command lines.

A manifest written for ``vllm serve`` (Helm values, KServe ServingRuntimes, Kubernetes
Deployments) passes flags such as ``--model``, ``-tp 1`` or ``--disable-log-requests``; argparse
refused them with "unrecognized arguments", so a manifest had to be rewritten for vlmserve. Here
each one is either honoured or, when its value asks for something vlmserve cannot do (``-tp 2``:
one engine spans one device), refused with a message that says why and what to do instead.

* ``--model`` the model folder or hub id (the positional MODEL / ``--model_dir``);
* ``--runner {auto,generate,pooling}`` = ``--task`` (``pooling``: embeddings); ``draft`` refused;
* ``-tp/--tensor-parallel-size``, ``-pp/--pipeline-parallel-size``: 1 only;
* ``--disable-log-requests``: accepted; vlmserve never logs request contents;
* ``--uvicorn-log-level``, ``--root-path`` (the prefix a path-routing proxy strips);
* ``--ssl-keyfile`` / ``--ssl-certfile`` (``python -m runtime`` has KServe's underscored ones);
* ``--allowed-origins``: CORS origins, a JSON list as vLLM takes it or comma-separated.
"""

from __future__ import annotations

import argparse
import json

RUNNERS = ["auto", "generate", "pooling", "draft"]
UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
SCALE_OUT = ("vlmserve runs each engine on one device; serve a model that fits one device and scale out with "
             "replicas (KServe minReplicas/maxReplicas, or the chart's replicas)")


def parse_origins(value: str) -> list[str]:
    """``'["https://a.example", "https://b.example"]'`` (vLLM's JSON form) or ``a.example,b.example``."""
    text = value.strip()
    if text.startswith("["):
        try:
            origins = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
        if not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError("the JSON form must be a list of strings")
        return origins
    return [o.strip() for o in text.split(",") if o.strip()]


def add_vllm_compat_args(parser: argparse.ArgumentParser, *, ssl: bool = True) -> None:
    """Add the flags; ``ssl=False`` where the parser has KServe's ``--ssl_keyfile`` already (its
    dashed spelling then reaches it through ``normalize_argv``)."""
    g = parser.add_argument_group("vLLM compatibility")
    g.add_argument("--model", dest="vllm_model", default=None, metavar="MODEL",
                   help="the model folder or hub id (vLLM's flag; the same as MODEL / --model_dir)")
    g.add_argument("--runner", choices=RUNNERS, default=None,
                   help="vLLM's runner: generate (= --task generate), pooling (= --task embedding), auto")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, metavar="N", help="1 only (see --help)")
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, metavar="N", help="1 only")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM's manifests: vlmserve does not log request contents")
    g.add_argument("--uvicorn-log-level", choices=UVICORN_LOG_LEVELS, default=None,
                   help="the HTTP server's log level (uvicorn's loggers; default: info)")
    g.add_argument("--root-path", default="", metavar="PATH",
                   help="the path prefix a proxy strips before forwarding (ASGI root_path)")
    g.add_argument("--allowed-origins", type=parse_origins, default=None, metavar="ORIGINS",
                   help="CORS: origins browsers may call from, JSON '[\"https://a.example\"]' or a,b "
                        "(default: no CORS headers)")
    if ssl:
        g.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="TLS: the server's private key")
        g.add_argument("--ssl-certfile", default=None, metavar="FILE", help="TLS: the server's certificate")


def apply_vllm_compat(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check the values (``parser.error``, exit code 2, for one that cannot be honoured) and fold
    ``--runner`` into ``ns.task``; ``--model`` is left to the caller (the two command lines name
    the model differently)."""
    for flag, size in (("--tensor-parallel-size", ns.tensor_parallel_size),
                       ("--pipeline-parallel-size", ns.pipeline_parallel_size)):
        if size != 1:
            parser.error(f"{flag} {size}: {SCALE_OUT}")
    if ns.runner == "draft":
        parser.error("--runner draft: vlmserve has no speculative decoding; use --runner generate")
    if ns.runner == "pooling":
        ns.task = "embedding"
    elif ns.runner == "generate" and ns.task not in ("generate",):
        parser.error(f"--runner generate contradicts --task {ns.task}")
