"""Airflow's REST API as the admin user of the simple auth manager, for the tests that run a real
Airflow: ``airflow standalone`` (tests/dags) and the local cluster (tests/cluster)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx

PASSWORDS = "simple_auth_manager_passwords.json.generated"


class AirflowREST:
    """Requests to ``url`` with a token for ``admin``, whose password Airflow wrote to ``passwords``;
    ``describe()`` adds context (e.g. a log tail) to a timeout's message."""

    def __init__(self, url: str, passwords: Path, describe: Callable[[], str] = lambda: "") -> None:
        self.url, self.passwords, self.describe = url, passwords, describe
        self._token: str | None = None

    @property
    def password(self) -> str:
        return json.loads(self.passwords.read_text())["admin"]

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        if self._token is None:
            r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password},
                           timeout=30)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        headers = {"Authorization": f"Bearer {self._token}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.api("GET", f"/api/v2/dags/{dag_id}").status_code == 200:
                return
            time.sleep(2)
        raise AssertionError(f"{dag_id} never appeared: {self.describe()}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """The final state of a run: ``success`` or ``failed``."""
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json().get("state")
            if state in ("success", "failed"):
                return state
            time.sleep(1)
        raise AssertionError(f"run {run_id} still {state} after {timeout} s: {self.describe()}")
