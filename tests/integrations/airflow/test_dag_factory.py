"""DAG building blocks: the trigger form's params, retries and the retry policy, GPU routing."""

from __future__ import annotations

import pytest

pytest.importorskip("airflow")

from airflow.sdk import RetryAction  # noqa: E402

from slerp_plugin.errors import ConfigError, HubUnavailableError  # noqa: E402
from slerp_plugin.integrations.airflow import dag_factory  # noqa: E402


def test_form_params_have_defaults_and_ranges():
    params = dag_factory.merge_params(model_1="org/a", t=0.3)
    assert params["model_1"].value == "org/a" and params["t"].value == 0.3
    # bounds the form does not clamp to (it would, silently, to a schema's own minimum/maximum)
    assert params["t"].schema["allOf"] == [{"minimum": 0, "maximum": 1}]
    assert "maximum" not in params["t"].schema
    assert params["DOT_THRESHOLD"].schema["allOf"] == [{"exclusiveMinimum": 0, "maximum": 1}]
    from airflow.sdk.exceptions import ParamValidationError

    assert params["t"].resolve(0.7) == 0.7
    with pytest.raises(ParamValidationError, match="maximum"):
        params["t"].resolve(1.5)
    assert params["model_1_revision"].value is None  # empty field allowed


def test_retries_back_off_and_the_policy_tells_errors_apart(monkeypatch):
    monkeypatch.setenv("SLERP_RETRIES", "5")
    args = dag_factory.default_args()
    assert args["retries"] == 5 and args["retry_exponential_backoff"] == 2.0
    rules = {r.action: r for r in args["retry_policy"].rules}
    assert HubUnavailableError in rules[RetryAction.RETRY].exception
    assert any(issubclass(ConfigError, e) for e in (rules[RetryAction.FAIL].exception
                                                   if isinstance(rules[RetryAction.FAIL].exception, list)
                                                   else [rules[RetryAction.FAIL].exception]))


def test_gpu_routing_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLERP_GPU_QUEUE", "big-gpus")
    monkeypatch.delenv("SLERP_GPU_POOL", raising=False)
    assert dag_factory.gpu() == {"queue": "big-gpus", "pool": "default_pool"}
    monkeypatch.setenv("SLERP_OUTPUT_ROOT", "/srv/merges")
    assert str(dag_factory.output_root()) == "/srv/merges"
