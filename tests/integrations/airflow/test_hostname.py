"""The host name a task instance records: the worker's own name in the local cluster."""

from __future__ import annotations

import pytest


def test_hostname_names_the_worker(monkeypatch):
    from slerp_plugin.integrations.airflow.hostname import hostname

    monkeypatch.setenv("SLERP_HOSTNAME", "worker-gpu-2")
    assert hostname() == "worker-gpu-2"
    monkeypatch.delenv("SLERP_HOSTNAME")
    pytest.importorskip("airflow")
    from airflow.utils.net import getfqdn

    assert hostname() == getfqdn()
