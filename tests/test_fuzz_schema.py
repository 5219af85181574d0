"""Issue 13, "A fuzz test in CI": schemathesis against the schema the real server serves.

The server (``python -m runtime`` on 127.0.0.1, the tiny text Qwen2 on CPU, a short context and
few sequences per step, so that every generation is cheap) publishes its routes, with the request
bodies of the OpenAI and generate POST routes, at ``/openapi.json``. schemathesis loads that
schema and Hypothesis generates, for every operation in it, a bounded number of requests in each
of schemathesis' two modes: positive (bodies that match the schema) and negative (bodies and
parameters that break it). Every answer must be below 500 (schemathesis' ``not_a_server_error``
check), and every 4xx must carry a JSON body.

Bounded and deterministic: ``derandomize`` (the same cases on every run), no example database, no
shrinking (a failure is reported as generated, with a curl command to replay it), a fixed number
of examples per operation and mode, and a wall-clock budget past which the remaining cases are
skipped (and counted, so that a slow machine shows up rather than a CI timeout).

Generation stays short: ``max_tokens`` / ``min_tokens`` / ``n`` that validation accepts are
capped in the generated bodies (values past the context stay as generated: they must get a 400);
routes are never excluded. The model name in paths is the served one, so that bodies reach the
routes' own validation instead of a 404 for an unknown model.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import ServerProcess, running, server_env

schemathesis = pytest.importorskip("schemathesis")  # pyproject's `test` extras install it
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 4
EXAMPLES = 15  # per operation and generation mode
BUDGET_S = 100.0  # for the whole run; past it the remaining cases are skipped and reported
CAP_TOKENS = 4  # max_tokens / min_tokens that validation accepts are capped at this
CAP_N = 2  # and n / best_of at this
MODEL = "tiny"
# Path parameters fixed to the served model, so that bodies reach the route's own validation.
PATH_PARAMS = {"model_name": MODEL, "model_id": MODEL}


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", str(MAX_MODEL_LEN),
                "--max-num-seqs", str(MAX_NUM_SEQS)]
        super().__init__(model_dir, log_path, MODEL, args, server_env())


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("fuzz") / "server.log")
    with running(srv):
        yield srv


def _cap(params: Any) -> None:
    """Cap generation sizes in one JSON object of sampling parameters, in place."""
    if not isinstance(params, dict):
        return
    for key, cap in (("max_tokens", CAP_TOKENS), ("max_completion_tokens", CAP_TOKENS),
                     ("min_tokens", CAP_TOKENS), ("n", CAP_N), ("best_of", CAP_N)):
        value = params.get(key)
        # Only values the server would accept (a bool is not a count): larger ones must be refused.
        if isinstance(value, int) and not isinstance(value, bool) and cap < value <= MAX_MODEL_LEN:
            params[key] = cap


def cheap(case: Any) -> Any:
    """The case with its generation bounded: top-level OpenAI parameters, and v2 generate's
    ``parameters`` / ``sampling_parameters`` (an object, or its JSON text)."""
    body = case.body
    if isinstance(body, dict):
        _cap(body)
        _cap(body.get("parameters"))
        sampling = body.get("sampling_parameters")
        if isinstance(sampling, str):
            try:
                decoded = json.loads(sampling)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                _cap(decoded)
                body["sampling_parameters"] = json.dumps(decoded)
        else:
            _cap(sampling)
    return case


def _is_json(response: Any) -> bool:
    try:
        json.loads(response.content)
    except ValueError:
        return False
    # schemathesis' Response: header names in lower case, each with a list of values
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip() == "application/json"


def fuzz(url: str) -> dict[str, Any]:
    """Run every operation of the served schema; returns the statuses seen per operation, the
    failures (5xx, or a 4xx without a JSON body) and the number of cases run and skipped."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[str, collections.Counter] = {}
    failures: list[str] = []
    skipped = 0
    start = time.monotonic()

    settings = hypothesis.settings(
        max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking
        suppress_health_check=list(hypothesis.HealthCheck), report_multiple_bugs=False,
    )
    for op in operations:
        seen = statuses.setdefault(op.label, collections.Counter())
        fixed = {k: v for k, v in PATH_PARAMS.items() if "{" + k + "}" in op.path}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode, path_parameters=fixed or None).map(cheap)

            @settings
            @hypothesis.given(case=strategy)
            def run(case: Any) -> None:
                nonlocal skipped
                if time.monotonic() - start > BUDGET_S:
                    skipped += 1
                    return
                response = case.call(base_url=url, timeout=60)
                seen[response.status_code] += 1
                problem = None
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except (Exception, FailureGroup) as exc:  # schemathesis' failure, or a group of them
                    problem = f"{response.status_code} ({str(exc).strip().splitlines()[0]})"
                if problem is None and 400 <= response.status_code < 500 and not _is_json(response):
                    problem = f"{response.status_code} without a JSON body"
                if problem is not None:
                    failures.append(f"{op.label} [{mode.value}] {problem}\n  body: {response.text[:300]!r}\n"
                                    f"  replay: {case.as_curl_command()}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                # negative mode on an operation with nothing to break (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, op.label
    return {"operations": len(operations), "statuses": statuses, "failures": failures,
            "cases": sum(sum(c.values()) for c in statuses.values()), "skipped": skipped,
            "seconds": time.monotonic() - start}


def test_fuzz_served_schema(server):
    report = fuzz(server.url)
    summary = "\n".join(f"  {label}: {dict(sorted(c.items()))}" for label, c in report["statuses"].items())
    print(f"\nschemathesis {schemathesis.__version__}: {report['operations']} operations, {report['cases']} cases "
          f"({report['skipped']} skipped past the budget) in {report['seconds']:.1f} s\n{summary}")
    assert not report["failures"], "\n".join(report["failures"][:20]) + "\n" + server.tail()[-2000:]
    # Every operation of the schema was exercised, the 8 POST routes with bodies among them.
    assert report["operations"] >= 20 and all(sum(c.values()) > 0 for c in report["statuses"].values()), summary
    assert report["skipped"] == 0, f"the run outgrew its {BUDGET_S} s budget:\n{summary}"
    assert server.proc.poll() is None, server.tail()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def test_model_version_query_parameter_is_not_a_501(server):
    """Found by the fuzz test: KServe's ``GET /v2/models/{m}`` and ``.../ready`` take an optional
    ``model_version`` query parameter and answered any non-empty one with 501 ("Model versioning
    not supported yet."). The one version served answers as the model; another one 404 in JSON,
    as ``/v2/models/{m}/versions/{v}`` does."""
    get = lambda path, **params: httpx.get(server.url + path, params=params, timeout=10)
    assert get(f"/v2/models/{MODEL}", model_version="1").json()["name"] == MODEL
    assert get(f"/v2/models/{MODEL}/ready", model_version="1").json() == {"name": MODEL, "ready": True}
    assert get(f"/v2/models/{MODEL}", model_version="").json()["name"] == MODEL
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        r = get(path, model_version="2")
        assert r.status_code == 404 and "version" in r.json()["error"], (path, r.status_code, r.text)
    # an unknown model still answers KServe's 404
    assert get("/v2/models/nope", model_version="1").status_code == 404
