"""Property-based fuzzing of the server against its own OpenAPI schema (schemathesis): whatever a client
sends, within the schema or not, the answer is never a 500 and never a traceback. Examples are bounded
and derandomized, so it runs in seconds and the same way every time.

Cases are drawn from schemathesis' strategies in a plain hypothesis test: its pytest loader for
fixtures (`from_fixture`) does not run under pytest 9."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = 15  # per operation and mode


@pytest.fixture(scope="module")
def operations(serve_world):
    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    server = build_server([serve_world], head=serve_world / "head.safetensors")
    server.warm()  # the ASGI calls below do not run the app's start-up
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(server, warm_in_background=False))
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_has_every_endpoint(operations):
    assert len(operations) == 8


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_makes_a_server_error(operations, mode):
    cases = st.one_of([operation.as_strategy(generation_mode=mode) for operation in operations])

    @given(case=cases)
    @settings(max_examples=EXAMPLES * len(operations), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.operation.label, response.status_code, response.content[:300])
        assert b"Traceback" not in response.content
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:300]

    check()
