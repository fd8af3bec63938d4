"""The local cluster launcher without starting a cluster: settings, state, and what ``down`` stops
(tests/cluster/ runs the real stack)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from slerp_plugin.errors import ClusterError
from slerp_plugin.integrations.airflow import cluster as cl

ROOT = Path(__file__).resolve().parents[3]


def test_a_free_port_is_outside_the_ephemeral_range_and_skips_a_bound_one(monkeypatch):
    """A port chosen now and bound seconds later must not be one an outgoing connection or a
    port-0 bind can take meanwhile."""
    low, high = cl._ephemeral_ports()
    for _ in range(20):
        port = cl.free_port()
        assert not low <= port <= high and cl.PORTS_BELOW[0] <= port < cl.PORTS_BELOW[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert not cl._bindable(port)
        other = next(p for p in range(*cl.PORTS_BELOW)
                     if p != port and not low <= p <= high and cl._bindable(p))
        monkeypatch.setattr(cl.random, "sample", lambda seq, k: [port, other])
        assert cl.free_port() == other
        monkeypatch.setattr(cl, "_bindable", lambda p: False)  # none free there: the kernel picks one
        fallback = cl.free_port()
        assert fallback != port and fallback > 0


def test_the_ephemeral_range_is_the_kernel_s_or_linux_s_default_where_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(cl, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    (tmp_path / "range").write_text("40000\t50000\n")
    assert cl._ephemeral_ports() == (40000, 50000)
    (tmp_path / "range").write_text("not numbers")
    assert cl._ephemeral_ports() == (32768, 60999)
    (tmp_path / "range").unlink()
    assert cl._ephemeral_ports() == (32768, 60999)


def test_env_file_is_plain_key_value(tmp_path):
    f = tmp_path / "a.env"
    f.write_text("# comment\n\nA=1\nB_2 = x y\n")
    assert cl.read_env_file(f) == {"A": "1", "B_2": "x y"}
    for bad in ('A="1"\n', "A=${B}\n", "not a line\n", "1A=2\n"):
        f.write_text(bad)
        with pytest.raises(ClusterError, match=r"a\.env:1: expected a plain KEY=VALUE line"):
            cl.read_env_file(f)
    with pytest.raises(ClusterError, match="cannot read the settings file"):
        cl.read_env_file(tmp_path / "missing.env")


def test_airflow_env_takes_the_shared_file_then_this_hosts_settings(tmp_path):
    settings = cl.ClusterSettings(home=tmp_path, env_file=ROOT / "docker" / "airflow.env", dags=ROOT / "dags",
                                  plugins=ROOT / "plugins", outputs=tmp_path / "m", recipes=tmp_path / "r",
                                  port=18123, env={"EXTRA": "1"})
    launcher = cl._Launcher(settings)
    keys = cl.Cluster(tmp_path).secrets()
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert cl.Cluster(tmp_path).secrets() == keys  # made once per home
    env = launcher.airflow_env(keys)
    shared = cl.read_env_file(ROOT / "docker" / "airflow.env")
    assert {k: env[k] for k in shared} == shared
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    assert keys["postgres"] in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CELERY__BROKER_URL"].endswith(f"@127.0.0.1:{launcher.ports['redis']}/0")
    assert env[cl.CLUSTER_ENV] == str(tmp_path.resolve()) and env["EXTRA"] == "1"
    assert len(set(launcher.ports.values())) == len(launcher.ports)


def _sleeper(env: dict | None = None, children: int = 0) -> subprocess.Popen:
    code = "import subprocess, sys, time\n"
    code += "".join("subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                    for _ in range(children))
    code += "time.sleep(60)\n"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            start_new_session=True)


def _record(home: Path, procs: dict[str, subprocess.Popen], created_offset: float = 0.0) -> None:
    c = cl.Cluster(home)
    c._record([cl.Started(name, p.pid, psutil.Process(p.pid).create_time() + created_offset, "x.log")
               for name, p in procs.items()])


def _gone(p: subprocess.Popen) -> bool:
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_down_stops_what_up_recorded_its_children_and_orphans_with_the_marker(tmp_path):
    home = tmp_path.resolve()
    worker = _sleeper(children=2)
    time.sleep(1.0)
    kids = psutil.Process(worker.pid).children(recursive=True)
    orphan = _sleeper({cl.CLUSTER_ENV: str(home)})  # e.g. a task process whose worker was killed
    stranger = _sleeper({cl.CLUSTER_ENV: str(home / "other")})
    try:
        _record(home, {"worker-gpu-1": worker})
        stopped = cl.down(home, timeout=5)
        assert stopped[0] == "worker-gpu-1" and stopped[1] == f"orphan {orphan.pid}"
        assert _gone(worker) and _gone(orphan)
        assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
        assert stranger.poll() is None  # another home's process is not ours
        assert not (home / cl.STATE_FILE).exists()
    finally:
        for p in (worker, orphan, stranger):
            p.kill()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass


def test_down_never_signals_a_reused_pid(tmp_path):
    other = _sleeper()
    try:
        _record(tmp_path, {"scheduler": other}, created_offset=-100.0)  # the PID now belongs to another
        assert cl.down(tmp_path, timeout=1) == []
        assert other.poll() is None
    finally:
        other.kill()


def test_state_that_is_not_ours_or_is_damaged_is_refused(tmp_path):
    (tmp_path / cl.STATE_FILE).write_text(json.dumps({"processes": []}))
    with pytest.raises(ClusterError, match="not this tool's cluster state"):
        cl.down(tmp_path)
    (tmp_path / cl.STATE_FILE).write_text(json.dumps({"tool": "slerp_plugin", "processes": [{"pid": 1}]}))
    with pytest.raises(ClusterError, match="^unreadable cluster state"):
        cl.down(tmp_path)
    (tmp_path / "secrets.json").write_text("{not json")
    with pytest.raises(ClusterError, match="remove it to make new secrets"):
        cl.Cluster(tmp_path).secrets()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cl.main(["up", "--home", str(tmp_path), "--env-file", str(tmp_path / "none.env"),
                    "--gpu-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slerp-cluster: error: --gpu-workers")
    assert cl.main(["status", "--home", str(tmp_path)]) == 0
    assert cl.main(["down", "--home", str(tmp_path)]) == 0
    assert "stopped 0 process(es)" in capsys.readouterr().out


def test_up_refuses_a_running_cluster(tmp_path):
    p = _sleeper()
    try:
        _record(tmp_path, {"api-server": p})
        settings = cl.ClusterSettings(home=tmp_path, env_file=ROOT / "docker" / "airflow.env",
                                      dags=ROOT / "dags", plugins=ROOT / "plugins", outputs=tmp_path,
                                      recipes=tmp_path)
        with pytest.raises(ClusterError, match="already running"):
            cl.up(settings)
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as nobody only when started by root")
def test_postgres_binaries_nobody_cannot_reach_are_copied_into_the_home(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("pgserver is not installed")
    private = tmp_path / "private"  # like a venv under a 0700 home
    private.mkdir(mode=0o700)
    real = cl._pgserver_dir()
    shutil.copytree(real / "pginstall", private / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(real.parent / "pgserver.libs", private / "pgserver.libs", symlinks=True)
    monkeypatch.setattr(cl, "_pgserver_dir", lambda: private / "pgserver")
    home = Path(tempfile.mkdtemp(prefix="slerp-cluster-test-"))  # a home every user can traverse
    try:
        home.chmod(0o755)
        launcher = cl._Launcher(cl.ClusterSettings(home=home, env_file=ROOT / "docker" / "airflow.env",
                                                   dags=ROOT / "dags", plugins=ROOT / "plugins",
                                                   outputs=home, recipes=home))
        postgres = launcher.pg_bin("postgres")
        assert postgres.startswith(str(home.resolve() / "pgserver-copy"))
        for program in (postgres, launcher.pg_bin("initdb")):
            r = subprocess.run(launcher._postgres_cmd([program, "--version"]), capture_output=True, text=True)
            assert r.returncode == 0 and "PostgreSQL" in r.stdout, r.stderr
    finally:
        shutil.rmtree(home)
