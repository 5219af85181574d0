"""The one start-up line that says where everything is served.

KServe and uvicorn each log pieces of this (a port here, "endpoints not registered" there); a
user starting the server, or reading a pod's log, wants one line with every endpoint's URL.
"""

from __future__ import annotations

from collections.abc import Sequence


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return host or "0.0.0.0"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def banner(model_names: Sequence[str], host: str, http_port: int, grpc_port: int | None, *, tls: bool = False,
           root_path: str = "", api_key: bool = False, api_server_count: int = 1) -> str:
    """``vlmserve serving MODEL [aliases] | HTTP ...: OpenAI ..., KServe v2 ..., ... | gRPC ...``."""
    name = model_names[0]
    base = f"{'https' if tls else 'http'}://{_url_host(host)}:{http_port}{root_path}"
    parts = [
        f"vlmserve serving {name}" + (f" (also as {', '.join(model_names[1:])})" if len(model_names) > 1 else ""),
        f"HTTP {base}: OpenAI /v1/chat/completions /v1/completions /v1/embeddings /v1/models /health; "
        f"KServe v2 /v2/models/{name}/infer /v2/models/{name}/generate /v2/models/{name}/generate_stream "
        f"/v2/models/{name} /v2/models/{name}/config /v2/health/live /v2/health/ready; Prometheus /metrics; "
        "API schema /openapi.json",
        (f"gRPC {_url_host(host)}:{grpc_port} (inference.GRPCInferenceService, KServe v2 + Triton's "
         "ModelStreamInfer and ModelConfig)") if grpc_port is not None else "gRPC off",
    ]
    if api_key:
        parts.append("API key required on /v1 and /v2 (not on health and /metrics)")
    if api_server_count > 1:
        parts.append(f"{api_server_count} API server processes")
    parts.append("ready once /v2/health/ready and /health answer 200")
    return " | ".join(parts)
