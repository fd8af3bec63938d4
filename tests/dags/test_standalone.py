"""End to end with a real scheduler: ``airflow standalone`` on 127.0.0.1, triggered through the
REST API and through the UI in headless Chromium (Debian's). Slow: marked ``slow``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from airflow_rest import PASSWORDS, AirflowREST

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


#: what uvicorn logs when the API server's port was taken between choosing it and binding it
PORT_TAKEN = "error while attempting to bind"
#: the parts of ``airflow standalone``, each prefixing its lines in the shared log
PARTS = ("standalone", "api-server", "scheduler", "dag-processor", "triggerer")


class PortTaken(RuntimeError):
    pass


class Standalone(AirflowREST):
    """``make airflow-ui`` as a user starts it from a fresh shell (the venv not on PATH), on a free
    port, with its own home, outputs and recipes."""

    def __init__(self, home: Path, outputs: Path, recipes: Path) -> None:
        from slerp_plugin.integrations.airflow.cluster import free_port

        self.home = home
        self.outputs = outputs
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", home / PASSWORDS, describe=self.tail)
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
        self.crash_points = home / "crash-points"  # one-shot crash points for the worker's tasks
        self.crash_points.mkdir(exist_ok=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV"))},
               "PATH": path, "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "SLERP_RETRY_DELAY_S": "1",
               "SLERP_PLUGIN_CRASH_DIR": str(self.crash_points)}
        self.log = open(home / "standalone.log", "w")
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "airflow-ui", f"AIRFLOW_HOME_DIR={home}",
             f"AIRFLOW_PORT={self.port}", f"SLERP_OUTPUT_ROOT={outputs}", f"SLERP_RECIPES_DIR={recipes}"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited: {self.tail()}")
            if PORT_TAKEN in self.log_text():  # the API server is gone; the other parts run on
                raise PortTaken(f"port {self.port} was taken before the API server bound it")
            try:
                r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
                if r.status_code == 200 and r.json()["scheduler"]["status"] == "healthy":
                    if self.passwords.is_file():
                        return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(2)
        raise RuntimeError(f"airflow standalone not healthy in {timeout} s: {self.tail()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.home / "standalone.log").read_text(errors="replace")

    def tail(self) -> str:
        """The last lines of each part (the DAG processor alone would fill any tail of the log)."""
        lines = self.log_text().splitlines()
        parts = [[line for line in lines if line.startswith(f"{part} |")][-8:] for part in PARTS]
        return "\n".join(line[:300] for part in parts for line in part)

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever of it is left after 30 s (a part
        orphaned while it started may outlive ``make`` and ignore SIGTERM)."""
        import signal

        group = self.proc.pid
        deadline = time.time() + 30
        try:
            os.killpg(group, signal.SIGTERM)
            while time.time() < deadline:
                self.proc.poll()
                os.killpg(group, 0)  # ProcessLookupError once the whole group is gone
                time.sleep(0.2)
            os.killpg(group, signal.SIGKILL)
            while time.time() < deadline + 10:
                self.proc.poll()
                os.killpg(group, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            pass
        self.log.close()


def start_standalone(home: Path, outputs: Path, recipes: Path, tries: int = 3) -> Standalone:
    """A healthy :class:`Standalone`, started again on another port where its port was taken."""
    for attempt in range(tries):
        server = Standalone(home, outputs, recipes)
        try:
            server.wait_healthy()
            return server
        except PortTaken:
            server.stop()
            if attempt == tries - 1:
                raise
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory, demo_bf16):
    pytest.importorskip("airflow")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    home = tmp_path_factory.mktemp("standalone-home")
    recipes = tmp_path_factory.mktemp("standalone-recipes")
    (recipes / "nightly.yaml").write_text(yaml.safe_dump({
        "name": "nightly", "schedule": "30 3 * * *", "model_1": str(demo_bf16[0]),
        "model_2": str(demo_bf16[1]), "t": 0.4, "validate_functional": False}))
    server = start_standalone(home, tmp_path_factory.mktemp("standalone-merges"), recipes)
    try:
        server.wait_dag("slerp_merge")
        yield server
    finally:
        server.stop()


def test_dags_start_unpaused_and_a_recipe_gets_its_nightly_dag(standalone):
    """No PATCH is_paused: the embedded default creates DAGs unpaused; a recipe's DAG is there with
    its cron. (That the scheduler fires it by itself is tested on the cluster, tests/cluster.)"""
    assert standalone.api("GET", "/api/v2/dags/slerp_merge").json()["is_paused"] is False
    standalone.wait_dag("slerp_nightly_nightly")
    dag = standalone.api("GET", "/api/v2/dags/slerp_nightly_nightly").json()
    assert dag["is_paused"] is False and "30 3 * * *" in str(dag.get("timetable_summary") or dag)


def test_trigger_through_the_rest_api(standalone, demo_bf16):
    conf = {"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 0.3, "eval_max_tokens": 64}
    bad = standalone.api("POST", "/api/v2/dags/slerp_merge/dagRuns",
                         json={"logical_date": None, "conf": {**conf, "t": 1.5}})
    assert bad.status_code == 400
    r = standalone.api("POST", "/api/v2/dags/slerp_merge/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert standalone.wait_run("slerp_merge", run_id) == "success", standalone.tail()
    outs = list(standalone.outputs.glob("slerp_merge/*/merged"))
    assert len(outs) == 1 and json.loads((outs[0] / "merge_manifest.json").read_text())["spec"]["t"] == 0.3
    assert task_log_errors(standalone, "slerp_merge", run_id) == {}


# one crash point per kind of step of the output protocol, in the task that reaches it
WORKER_DEATHS = {
    "create .merged.partial.new-": "exit",  # the working folder (plan task)
    "rename model-00002-of-00003.safetensors into place": "kill",  # a shard (merge task)
    "rename model-00001-of-00003.safetensors.json into place": "exit",  # its journal entry
    "rename merge_manifest.json into place": "kill",  # finalize's files
    "rename merged.partial to merged": "kill",  # the final rename
}
#: concurrent runs that share the crash points: whichever task first reaches a step dies there, so a
#: task may die more than once (at most twice: fewer than its retries) before it succeeds
RUNS = 2


def test_a_worker_that_dies_at_any_kind_of_step_is_retried_and_the_run_succeeds(standalone, demo_bf16):
    """The task's process is killed (SIGKILL, or os._exit) at a step of the output protocol;
    Airflow retries the task and the run succeeds without anyone touching the output."""
    from slerp_plugin.integrations.airflow.records import run_folder_name

    runs = {}
    for i, (text, mode) in enumerate(WORKER_DEATHS.items()):
        (standalone.crash_points / f"point-{i}").write_text(f"{text}:{mode}")
    for i in range(RUNS):
        conf = {"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": round(0.21 + 0.01 * i, 2),
                "max_shard_size": "100KB", "validate_functional": False}
        for _ in range(10):  # SQLite: a trigger racing the scheduler's writes may get "Database error"
            r = standalone.api("POST", "/api/v2/dags/slerp_merge/dagRuns",
                               json={"logical_date": None, "conf": conf})
            if r.status_code < 500:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        runs[r.json()["dag_run_id"]] = conf["t"]
    for run_id in runs:
        assert standalone.wait_run("slerp_merge", run_id, timeout=600) == "success", standalone.tail()
    assert list(standalone.crash_points.iterdir()) == [], "a crash point was never reached"
    retried = {}
    for run_id, t in runs.items():
        # each try of a task leaves its log file (Airflow's default layout): count the later tries
        logs = standalone.home / "logs" / "dag_id=slerp_merge" / f"run_id={run_id}"
        retried[run_id] = sorted(str(p.relative_to(logs)) for p in logs.rglob("attempt=*.log")
                                 if p.name != "attempt=1.log")
        out = standalone.outputs / "slerp_merge" / run_folder_name(run_id) / "merged"
        assert json.loads((out / "merge_manifest.json").read_text())["spec"]["t"] == t
        assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("merged")) == ["merged"]
    tries = [path for paths in retried.values() for path in paths]
    assert len(tries) == len(WORKER_DEATHS), retried  # one more try per death, none failed for good
    tasks = {path.rsplit("/", 1)[0] for path in tries}
    assert {"task_id=plan", "task_id=merge/map_index=0", "task_id=finalize"} <= tasks, retried


def task_log_errors(standalone, dag_id: str, run_id: str) -> dict[str, list[str]]:
    """Error-level lines and tracebacks in each task's log of a run, read back through the REST API."""
    base = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    found: dict[str, list[str]] = {}
    instances = standalone.api("GET", base).json()["task_instances"]
    assert instances
    for ti in instances:
        if ti["state"] == "skipped":
            continue
        r = standalone.api("GET", f"{base}/{ti['task_id']}/logs/{ti['try_number']}",
                           params={"map_index": ti["map_index"]}, headers={"Accept": "application/json"})
        assert r.status_code == 200, (ti["task_id"], ti["map_index"], r.text)
        entries = [e for e in r.json()["content"] if isinstance(e, dict)]
        assert any("level" in e for e in entries), f"{ti['task_id']}: no structured entries: {r.text[:300]}"
        bad = [str(e.get("event")) for e in entries
               if e.get("level") in ("error", "critical") or "Traceback" in str(e.get("event"))]
        if bad:
            found[ti["task_id"]] = bad
    return found


#: what the UI tests launch Chromium with (headless, nothing fetched from the internet)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser(standalone):
    """One headless Chromium (Debian's) for the UI tests, closed before ``standalone`` stops; each
    test opens its own contexts in it."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(browser, standalone):
    """A page logged in as admin through the login form, shared by the UI tests (one login)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.goto(standalone.url, wait_until="domcontentloaded")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(standalone.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/login" not in url, timeout=30_000)
        page.get_by_text("Dags").first.wait_for(timeout=30_000)
        yield page
    finally:
        context.close()


def fill_trigger_form(page, standalone, demo_bf16, t: str) -> None:
    page.goto(f"{standalone.url}/dags/slerp_merge", wait_until="domcontentloaded")
    page.get_by_label("Trigger Dag").first.click()
    page.locator("input[name=element_model_1]").fill(str(demo_bf16[0]))
    page.locator("input[name=element_model_2]").fill(str(demo_bf16[1]))
    page.locator("input[name=element_t]").fill(t)
    page.locator("input[name=element_eval_max_tokens]").fill("64")
    page.locator("input[name=element_model_1]").click()  # leave the t field, as a user would


def test_trigger_from_the_ui_in_headless_chromium(standalone, demo_bf16, page):
    runs = standalone.api("GET", "/api/v2/dags/slerp_merge/dagRuns").json()["dag_runs"]
    before = {r["dag_run_id"] for r in runs}
    try:
        fill_trigger_form(page, standalone, demo_bf16, "1.5")
        assert page.locator("input[name=element_t]").input_value() == "1.5"  # not clamped to 1
        page.get_by_role("dialog").get_by_role("button", name="Trigger").click()
        page.get_by_role("dialog").get_by_text("maximum").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "trigger-form-t-out-of-range.png"))
        runs = standalone.api("GET", "/api/v2/dags/slerp_merge/dagRuns").json()["dag_runs"]
        assert {r["dag_run_id"] for r in runs} == before, "an out-of-range t created a run"
        fill_trigger_form(page, standalone, demo_bf16, "0.7")
        page.screenshot(path=str(ARTIFACTS / "trigger-form.png"))
        page.get_by_role("dialog").get_by_role("button", name="Trigger").click()
        deadline = time.time() + 60
        new = set()
        while time.time() < deadline and not new:
            runs = standalone.api("GET", "/api/v2/dags/slerp_merge/dagRuns").json()["dag_runs"]
            new = {r["dag_run_id"] for r in runs} - before
            time.sleep(1)
        assert new, "the trigger form did not create a run"
        run_id = new.pop()
        assert standalone.wait_run("slerp_merge", run_id) == "success", standalone.tail()
        conf = standalone.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run_id}").json()["conf"]
        assert conf["t"] == 0.7
        page.goto(f"{standalone.url}/dags/slerp_merge/runs/{run_id}", wait_until="domcontentloaded")
        page.get_by_text("success").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "run-success.png"))
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "ui-failure.png"))
        raise


def test_merges_dashboard_in_the_ui(standalone, browser, page):
    runs = standalone.api("GET", "/api/v2/dags/slerp_merge/dagRuns").json()["dag_runs"]
    done = [r["dag_run_id"] for r in runs if r["state"] == "success"]
    assert done, "needs the runs of the tests above"
    for path in ("/slerp/", "/slerp/api/merges", f"/slerp/runs/slerp_merge/{done[0]}"):
        anonymous = httpx.get(f"{standalone.url}{path}", timeout=30)
        assert anonymous.status_code == 401 and done[0] not in anonymous.text, path
    api = standalone.api("GET", "/slerp/api/merges").json()
    assert {e["run_id"] for e in api["merges"]} >= set(done)
    logged_out_page(browser, standalone, done[0])
    try:
        page.goto(f"{standalone.url}/plugin/slerp_merges", wait_until="domcontentloaded")
        frame = page.frame_locator("iframe").first
        frame.get_by_text(done[0]).first.wait_for(timeout=30_000)
        frame.get_by_text("PASS").first.wait_for(timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "slerp-merges-dashboard.png"))
        page.goto(f"{standalone.url}/dags/slerp_merge/runs/{done[0]}/plugin/slerp_merge_of_run",
                  wait_until="domcontentloaded")
        page.frame_locator("iframe").first.get_by_text("1 merge(s)").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "dag-run-merge-tab.png"))
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"))
        raise


def logged_out_page(browser, standalone, run_id: str) -> None:
    """A browser context that never logged in gets no data from the dashboard."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        response = page.goto(f"{standalone.url}/slerp/", wait_until="domcontentloaded")
        assert response.status == 401
        assert run_id not in page.content() and "PASS" not in page.content()
        page.screenshot(path=str(ARTIFACTS / "dashboard-logged-out.png"))
    finally:
        context.close()
