"""The "SLERP merges" dashboard: a FastAPI app over the merges and run records on disk.

It reads ``<root>/<dag_id>/<run folder>/`` under each root in ``$SLERP_DASHBOARD_ROOTS``
(``:``-separated; default ``$SLERP_OUTPUT_ROOT``): each merge's ``merge_manifest.json``,
``validation.json`` and ``hub_upload.json`` (a streamed run keeps the first and the last in
``streamed/``), and the run's records (:mod:`.records`). Everything
read is untrusted: it is validated, and a merge whose files do not validate is listed as unreadable.

Every route answers only users Airflow has authenticated (the UI's session cookie or an API token)
and who may see plugins; merges of DAGs a user may not read are left out. Pages are rendered from
an autoescaping template and link only to http(s) URLs. Routes:

- ``GET /`` — the page: failed runs, sweeps (plot and table with the parents and the chosen t),
  every merge;
- ``GET /runs/{dag_id}/{run_id}`` — the same for one DAG run (the run page's "Merge" tab);
- ``GET /api/merges`` — the merges as JSON; ``GET /plot/{dag_id}/{run_id}.svg`` — a sweep's plot.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' parameter annotations, and
# names imported inside functions (Airflow's, which load only in its API server) must resolve

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlencode, urlparse

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Query as FastAPIQuery
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field, ValidationError, field_validator

from ...errors import first_line
from ...formats.manifest import MANIFEST_NAME
from ...hub.client import UPLOAD_RECORD
from ...validate.report import REPORT_NAME, ValidationReport
from .dashboard_index import FolderIndex
from .records import (
    FAILURE_RECORD,
    RUN_RECORD,
    SWEEP_RECORD,
    FailureRecord,
    RunRecord,
    SweepRecord,
    read_record,
)

MAX_JSON_BYTES = 64 << 20  #: a manifest larger than this is not read (listed as unreadable)
PER_PAGE = 50  #: merges per page, newest first
MAX_FAILED_SHOWN = 20  #: the newest failed runs shown (the count says how many there are)
ReadableDags = Callable[[set[str]], set[str]]


class Parent(BaseModel):
    ref: str
    revision: str | None = None
    commit: str | None = None


class UploadRecord(BaseModel):
    """``hub_upload.json``, validated: a repo id, a commit sha and an http(s) URL."""

    published: bool
    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
    commit: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError("not an http(s) URL")
        return v


class RunItem(BaseModel):
    """Something that belongs to a DAG run, linked to the run's page in the UI."""

    dag_id: str
    run_id: str

    @property
    def run_link(self) -> str:
        return f"/dags/{quote(self.dag_id, safe='')}/runs/{quote(self.run_id, safe='')}"


class MergeEntry(RunItem):
    """One merge folder as the dashboard shows it."""

    output: str
    readable: bool = True
    error: str | None = None
    created_at: str | None = None
    parents: list[Parent] = Field(default_factory=list)
    t: float | None = None
    t_schedule: bool = False
    DOT_THRESHOLD: float | None = None
    hub_repo: str | None = None
    hub_commit: str | None = None
    hub_url: str | None = None
    validation: str = "not validated"  #: passed | failed | not validated
    perplexity: dict[str, float] = Field(default_factory=dict)
    eval_tokens: int | None = None
    eval_text: str | None = None


class FailedRun(RunItem):
    """A run whose last failed task left a failure record."""

    folder: str
    failure: FailureRecord


class Sweep(BaseModel):
    """A run with several merges (a t sweep), merges sorted by t."""

    dag_id: str
    run_id: str
    merges: list[MergeEntry]
    chosen_t: float | None = None
    parents: dict[str, float] = Field(default_factory=dict)  #: model_1/model_2 → perplexity
    mode: str = "merge-each"  #: or one-pass: each t evaluated without writing its merge

    @property
    def best_parent(self) -> str | None:
        """The parent whose perplexity is lower than every merge's, if one is."""
        merged = [m.perplexity["merged"] for m in self.merges if "merged" in m.perplexity]
        if not merged or not self.parents:
            return None
        role, value = min(self.parents.items(), key=lambda kv: kv[1])
        return role if value < min(merged) else None

    @property
    def all_perplexities(self) -> list[float]:
        """The merges' and the parents' perplexities (for the decimals that tell them apart)."""
        merged = [m.perplexity["merged"] for m in self.merges if "merged" in m.perplexity]
        return merged + list(self.parents.values())


def roots() -> list[Path]:
    env = os.environ.get("SLERP_DASHBOARD_ROOTS") or os.environ.get("SLERP_OUTPUT_ROOT") or ""
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def _json(folder: Path, name: str, model: type[BaseModel]) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{name} is larger than {MAX_JSON_BYTES >> 20} MB")
    return model.model_validate_json(path.read_bytes())


def load_entry(folder: Path, dag_id: str, run_id: str) -> MergeEntry:
    """The entry of one merge folder; files that do not validate give an unreadable entry."""
    entry = MergeEntry(dag_id=dag_id, run_id=run_id, output=str(folder))
    try:
        man: ManifestView | None = _json(folder, MANIFEST_NAME, ManifestView)
        if man is None:
            raise ValueError(f"{MANIFEST_NAME} is missing")
        _fill_from_manifest(entry, man)
        report = read_record(folder, REPORT_NAME, ValidationReport)
        if report is not None:
            entry.validation = "passed" if report.passed else "failed"
            entry.perplexity = {k: v for k, v in report.functional.perplexity.items() if math.isfinite(v)}
            entry.eval_tokens = report.functional.tokens or None
            entry.eval_text = getattr(report.functional, "eval_text", None)
        up = read_record(folder, UPLOAD_RECORD, UploadRecord)  # an invalid record is not linked
        if up is not None and up.published:
            entry.hub_repo, entry.hub_commit, entry.hub_url = up.repo, up.commit, up.url
    except (OSError, ValueError, ValidationError) as e:
        entry = MergeEntry(dag_id=dag_id, run_id=run_id, output=str(folder), readable=False,
                           error=f"unreadable: {type(e).__name__}: {first_line(e)}"[:300])
    return entry


class _SpecView(BaseModel):
    """The manifest's spec fields the dashboard shows, with their types enforced."""

    t: float | list[Any]
    DOT_THRESHOLD: float


class _InputView(BaseModel):
    ref: str
    revision: str | None = None
    commit: str | None = None


class ManifestView(BaseModel):
    """The manifest's fields the dashboard shows, validated (the tensors' records are not read
    into objects: a 72B manifest has a thousand)."""

    created_at: str
    spec: dict[str, Any]
    inputs: dict[str, _InputView]


def _fill_from_manifest(entry: MergeEntry, man: ManifestView) -> None:
    spec = _SpecView.model_validate({key: man.spec.get(key) for key in ("t", "DOT_THRESHOLD")})
    entry.created_at = man.created_at
    entry.t = spec.t if isinstance(spec.t, float) else None
    entry.t_schedule = isinstance(spec.t, list)
    entry.DOT_THRESHOLD = spec.DOT_THRESHOLD
    entry.parents = [Parent(ref=i.ref, revision=i.revision, commit=i.commit)
                     for i in (man.inputs.get(r) for r in ("model_1", "model_2")) if i is not None]


def _run_id(run: Path) -> str:
    record = read_record(run, RUN_RECORD, RunRecord)
    return record.run_id if record is not None else unquote(run.name)


def _load_run(run: Path) -> tuple[str, dict[str, Any]]:
    return _run_id(run), {FAILURE_RECORD: read_record(run, FAILURE_RECORD, FailureRecord),
                          SWEEP_RECORD: read_record(run, SWEEP_RECORD, SweepRecord)}


def _merge_folders(run: Path) -> list[Path]:
    """A run's merge folders (``streamed/`` holds a streamed merge's records only)."""
    return sorted(f for f in [*run.glob("merged*"), run / "streamed"]
                  if f.is_dir() and not f.name.endswith(".partial") and ".replaced-" not in f.name)


#: the merges and run records under the roots, re-read only where a folder changed
INDEX = FolderIndex(_load_run, _merge_folders, load_entry)

Runs = dict[tuple[str, str], dict[str, Any]]  #: (dag_id, run_id) → the run's records


RESCAN_S = 1.0  #: requests within this many seconds of a scan of the same roots share it
_COLLECTED: dict[str, Any] = {}


def collect(search: Iterable[Path], *,
            max_age: float = 0.0) -> tuple[list[MergeEntry], list[FailedRun], Runs]:
    """Every merge under the roots (newest first), the failed runs (newest first), and each run's
    records, from :data:`INDEX` (as scanned up to ``max_age`` seconds ago)."""
    roots_found = [r for r in search if r.is_dir()]
    scanned = INDEX.scan(roots_found, max_age=max_age)
    key = (tuple(map(str, roots_found)), INDEX.generation)
    if _COLLECTED.get("key") == key:
        return _COLLECTED["value"]
    entries, failed, runs = [], [], {}
    for run in scanned:
        runs[(run.dag_id, run.run_id)] = run.records
        entries += [entry for _, entry in run.merges.values()]
        failure = run.records.get(FAILURE_RECORD)
        if failure is not None:
            failed.append(FailedRun(dag_id=run.dag_id, run_id=run.run_id, folder=str(run.folder),
                                    failure=failure))
    entries.sort(key=lambda e: (e.created_at or "", e.output), reverse=True)
    failed.sort(key=lambda f: f.failure.at, reverse=True)
    _COLLECTED.update(key=key, value=(entries, failed, runs))
    return entries, failed, runs


def collect_merges(search: list[Path] | None = None) -> list[MergeEntry]:
    """Every merge under the roots, newest first."""
    return collect(roots() if search is None else search)[0]


def sweeps(entries: list[MergeEntry], runs: Runs, *, every_run: bool = False) -> list[Sweep]:
    """Runs with more than one merge at a scalar t, with the parents' perplexities and the choice;
    and the one-pass sweeps of the runs of ``entries`` (``every_run``: of every run in ``runs``,
    those whose sweep merged nothing too), from their records."""
    by_run: dict[tuple[str, str], list[MergeEntry]] = {}
    for e in entries:
        if e.readable and e.t is not None:
            by_run.setdefault((e.dag_id, e.run_id), []).append(e)
    out = []
    for (dag_id, run_id), merges in by_run.items():
        record = runs.get((dag_id, run_id), {}).get(SWEEP_RECORD)
        if len(merges) < 2 or (record is not None and record.mode == "one-pass"):
            continue
        merges.sort(key=lambda e: e.t)
        parents = {role: m.perplexity[role] for m in merges for role in ("model_1", "model_2")
                   if role in m.perplexity}
        out.append(Sweep(dag_id=dag_id, run_id=run_id, merges=merges, parents=parents,
                         chosen_t=record.chosen_t if record is not None else None))
    for key in (runs if every_run else {k: None for k in by_run}):
        record = runs.get(key, {}).get(SWEEP_RECORD)
        if record is not None and record.mode == "one-pass" and record.points:
            out.append(_one_pass_sweep(*key, record))
    return out


def _one_pass_sweep(dag_id: str, run_id: str, record: SweepRecord) -> Sweep:
    """A one-pass sweep as the dashboard shows a sweep: one row per t (no merge folder but the chosen one)."""
    rows = [MergeEntry(dag_id=dag_id, run_id=run_id, output=record.report or "", t=p.t,
                       perplexity={} if p.perplexity is None else {"merged": p.perplexity},
                       validation="passed" if p.passed else "failed", eval_tokens=record.eval_tokens,
                       eval_text=record.eval_text) for p in sorted(record.points, key=lambda p: p.t)]
    return Sweep(dag_id=dag_id, run_id=run_id, merges=rows, parents=dict(record.parents),
                 chosen_t=record.chosen_t, mode="one-pass")


def ppl_decimals(values: Iterable[float]) -> int:
    """Decimals that tell the given perplexities apart: 2, more (up to 6) where two differ only
    further down."""
    finite = sorted({round(v, 9) for v in values if math.isfinite(v)})
    gaps = [b - a for a, b in zip(finite, finite[1:], strict=False) if b - a > 0]
    if not gaps:
        return 2
    return int(min(6, max(2, math.ceil(-math.log10(min(gaps))) + 1)))


def sweep_svg(sweep: Sweep) -> str:
    """Perplexity of the merges against t, the parents as horizontal lines, the chosen t marked (SVG)."""
    from ...sweep.plot import inline_svg, plot_sweep

    points = [(m.t, m.perplexity["merged"], m.validation != "failed") for m in sweep.merges
              if "merged" in m.perplexity]
    return inline_svg(plot_sweep(points, sweep.parents, sweep.chosen_t, "svg"))


_SVG_CACHE: dict[str, str] = {}
_SVG_CACHE_SIZE = 256


def cached_svg(sweep: Sweep) -> str:
    """:func:`sweep_svg`, kept for the last few hundred distinct sweeps (a plot takes tens of ms)."""
    key = sweep.model_dump_json()
    svg = _SVG_CACHE.get(key)
    if svg is None:
        if len(_SVG_CACHE) >= _SVG_CACHE_SIZE:
            _SVG_CACHE.pop(next(iter(_SVG_CACHE)))
        svg = _SVG_CACHE[key] = sweep_svg(sweep)
    return svg


class Query(BaseModel):
    """A page of the merges (newest first), optionally only one DAG's or one t's."""

    page: int = Field(1, ge=1, le=1_000_000)
    per_page: int = Field(PER_PAGE, ge=1, le=500)
    dag: str | None = Field(None, max_length=250)
    t: float | None = Field(None, ge=0, le=1)

    def link(self, **change: Any) -> str:
        """The query string of this query with ``change`` applied (defaults left out)."""
        values = {**self.model_dump(), **change}
        defaults = Query().model_dump()
        return "?" + urlencode({k: v for k, v in values.items() if v is not None and v != defaults[k]})


class Listing:
    """One page of merges with what the page shows beside them."""

    def __init__(self, entries: list[MergeEntry], total: int, failed: list[FailedRun],
                 sweep_list: list[Sweep], dags: list[str], query: Query) -> None:
        self.entries, self.total, self.failed, self.sweeps = entries, total, failed, sweep_list
        self.dags, self.query = dags, query

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))


def page_of(entries: list[MergeEntry], failed: list[FailedRun], runs: Runs, q: Query) -> Listing:
    """The page ``q`` asks for of ``entries`` (newest first), with the failed runs and the sweeps of
    the runs on that page; the DAG filter offers every DAG of ``runs``."""
    dags = sorted({d for d, _ in runs})
    if q.dag is not None:
        entries = [e for e in entries if e.dag_id == q.dag]
        failed = [f for f in failed if f.dag_id == q.dag]
    if q.t is not None:
        entries = [e for e in entries if e.t is not None and math.isclose(e.t, q.t, abs_tol=1e-9)]
    page = entries[(q.page - 1) * q.per_page: q.page * q.per_page]
    on_page = {(e.dag_id, e.run_id) for e in page}
    run_entries = [e for e in entries if (e.dag_id, e.run_id) in on_page]
    return Listing(page, len(entries), failed, sweeps(run_entries, runs), dags, q)


_ENV = Environment(loader=PackageLoader("slerp_plugin.integrations.airflow", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True))


def render_page(entries: list[MergeEntry], failed: list[FailedRun], sweep_list: list[Sweep], *,
                title: str = "SLERP merges", compact: bool = False, listing: Listing | None = None) -> str:
    """The dashboard page (server-rendered HTML, inline SVG plots; every value escaped); with
    ``listing``, one page of it with links to the others and the filter form."""
    from markupsafe import Markup

    plots = {(s.dag_id, s.run_id): Markup(cached_svg(s)) for s in sweep_list}
    return _ENV.get_template("merges.html").render(
        title=title, entries=entries, failed=failed, sweeps=sweep_list, plots=plots, compact=compact,
        listing=listing,
        roots=", ".join(map(str, roots())) or "none", fmt_t=_fmt_t, fmt_ppl=_fmt_ppl,
        ppl_decimals=ppl_decimals, fmt_when=_fmt_when,
    )


def _fmt_t(t: float | None, schedule: bool = False) -> str:
    if schedule:
        return "schedule"
    return "–" if t is None else f"{t:.4f}".rstrip("0").rstrip(".") or "0"


def _fmt_ppl(x: float | None, decimals: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:,.{decimals}f}"


def _fmt_when(iso: str | None) -> str:
    return "–" if not iso else iso.replace("T", " ")[:16]


def airflow_access() -> Callable[..., ReadableDags]:
    """A route dependency: Airflow's own authentication (session cookie or token) and the plugins
    view permission, yielding a filter of the DAG ids the user may read. Fails closed (403) where
    Airflow's API server is not importable."""
    try:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
        from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
    except ImportError:
        def deny() -> ReadableDags:
            raise HTTPException(403, "Airflow's authentication is not available")

        return deny
    check_view = requires_access_view(AccessView.PLUGINS)

    def readable(request: Request, user: GetUserDep) -> ReadableDags:
        check_view(request, user)
        def allowed(ids: set[str]) -> set[str]:
            return get_auth_manager().filter_authorized_dag_ids(dag_ids=set(ids), user=user, method="GET")

        return allowed

    return readable


def create_app(
    search: list[Path] | None = None, access: Callable[..., ReadableDags] | None = None
) -> FastAPI:
    """The FastAPI app the Airflow plugin mounts. ``search`` overrides the roots and ``access`` the
    authentication dependency (:func:`airflow_access` by default), for tests."""
    guard = access or airflow_access()
    app = FastAPI(title="SLERP merges", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(guard)])
    Readable = Annotated[ReadableDags, Depends(guard)]  # noqa: N806 (a type, local to this app)

    def visible(readable: ReadableDags, dag_id: str | None = None, run_id: str | None = None):
        """What this user may see: merges, failed runs and run records of the DAGs they may read."""
        entries, failed, runs = collect(roots() if search is None else search, max_age=RESCAN_S)
        allowed = readable({d for d, _ in runs})

        def keep(d: str, r: str) -> bool:
            return d in allowed and (dag_id is None or d == dag_id) and (run_id is None or r == run_id)

        return ([e for e in entries if keep(e.dag_id, e.run_id)],
                [f for f in failed if keep(f.dag_id, f.run_id)], {k: v for k, v in runs.items() if keep(*k)})

    def listing(readable: ReadableDags, q: Query) -> Listing:
        return page_of(*visible(readable), q)

    @app.get("/", response_class=HTMLResponse)
    def page(readable: Readable, q: Annotated[Query, FastAPIQuery()]) -> HTMLResponse:
        found = listing(readable, q)
        return HTMLResponse(render_page(found.entries, found.failed[:MAX_FAILED_SHOWN], found.sweeps,
                                        listing=found))

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_page(dag_id: str, run_id: str, readable: Readable) -> HTMLResponse:
        entries, failed, runs = visible(readable, dag_id, run_id)
        return HTMLResponse(render_page(entries, failed, sweeps(entries, runs, every_run=True), compact=True,
                                        title=f"SLERP merge of {dag_id} / {run_id}"))

    @app.get("/api/merges", response_class=JSONResponse)
    def api_merges(readable: Readable, q: Annotated[Query, FastAPIQuery()]) -> JSONResponse:
        found = listing(readable, q)
        return JSONResponse({
            "merges": [e.model_dump() | {"run_link": e.run_link} for e in found.entries],
            "total": found.total, "page": q.page, "per_page": q.per_page, "pages": found.pages,
            "dags": found.dags,
            "failed_runs": [f.model_dump() | {"run_link": f.run_link}
                            for f in found.failed[:MAX_FAILED_SHOWN]],
            "failed_total": len(found.failed)})

    @app.get("/plot/{dag_id}/{run_id}.svg", response_class=Response)
    def plot(dag_id: str, run_id: str, readable: Readable) -> Response:
        entries, _, runs = visible(readable, dag_id, run_id)
        found = sweeps(entries, runs, every_run=True)
        if not found:
            raise HTTPException(404, "no sweep for this run")
        return Response(sweep_svg(found[0]), media_type="image/svg+xml")

    return app
