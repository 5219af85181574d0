"""Import ``kserve`` without letting it parse our command line.

Importing ``kserve`` imports ``kserve.model_server``, which runs ``parser.parse_known_args()`` on
``sys.argv`` at import time (a bad value for one of its flags would exit the process, and its
abbreviation matching could swallow ours). Every vlmserve module takes kserve from here, imported
with ``sys.argv`` reduced to the program name, so KServe's module-level ``args`` hold its
defaults; ``runtime.server`` passes the real values explicitly.
"""

from __future__ import annotations

import sys

from runtime import metrics_multiprocess

# Before kserve imports prometheus_client: with several API server processes their metrics are
# kept in shared files (runtime.metrics_multiprocess).
metrics_multiprocess.prepare(sys.argv[1:])
_saved_argv = sys.argv
sys.argv = _saved_argv[:1]
try:
    import kserve
    from kserve import model_server
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.errors import ModelNotReady, ServerNotReady
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer
finally:
    sys.argv = _saved_argv

__all__ = ["FASTAPI_APP_IMPORT_STRING", "DataPlane", "GRPCServer", "ModelNotReady", "ModelRepositoryExtension", "RESTServer", "ServerNotReady",
           "kserve", "model_server"]
