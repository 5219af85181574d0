"""Internal errors as the client sees them: a short message and an id, never the exception's text.

An exception's message can carry a traceback or file paths (the engine core's, a library's); it
goes to the server log under a fresh id, and the client gets that id to quote.
"""

from __future__ import annotations

import logging
import uuid


def internal_error_message(logger: logging.Logger, exc: BaseException, what: str = "request failed") -> str:
    """Log ``exc`` with its traceback under a new request id; the message for the client."""
    request_id = uuid.uuid4().hex
    logger.error("%s (request id %s)", what, request_id, exc_info=exc)
    return f"Internal server error (request id {request_id}); the details are in the server log"
