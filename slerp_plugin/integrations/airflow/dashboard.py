"""The "SLERP merges" dashboard: a FastAPI app over the manifests and validation reports on disk.

It reads ``<root>/<dag_id>/<run_id>/merged*/`` folders under each root in
``$SLERP_DASHBOARD_ROOTS`` (``:``-separated; default ``$SLERP_OUTPUT_ROOT``): the
``merge_manifest.json``, ``validation.json`` and ``hub_upload.json`` the pipeline writes. A folder
whose manifest cannot be read is listed as unreadable, never an error page. Routes:

- ``GET /`` — the page: every merge (when, DAG run, parents and revisions, t, DOT_THRESHOLD,
  output, Hub commit, perplexities, pass/fail) and, for sweeps, perplexity against t;
- ``GET /runs/{dag_id}/{run_id}`` — the same for one DAG run (the run page's "Merge" tab);
- ``GET /api/merges`` — the entries as JSON; ``GET /plot/{dag_id}/{run_id}.svg`` — a sweep's plot.

Plots are rendered server-side with matplotlib (SVG), so the page works offline.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, Field

PUBLISH_RECORD = "hub_upload.json"


class Parent(BaseModel):
    ref: str
    revision: str | None = None
    commit: str | None = None


class MergeEntry(BaseModel):
    """One merge folder as the dashboard shows it."""

    dag_id: str
    run_id: str
    output: str
    readable: bool = True
    error: str | None = None
    created_at: str | None = None
    parents: list[Parent] = Field(default_factory=list)
    t: Any = None
    DOT_THRESHOLD: float | None = None
    hub_repo: str | None = None
    hub_commit: str | None = None
    hub_url: str | None = None
    validation: str = "not validated"  # passed | failed | not validated
    perplexity: dict[str, float] = Field(default_factory=dict)

    @property
    def run_link(self) -> str:
        return f"/dags/{quote(self.dag_id)}/runs/{quote(self.run_id)}"


def roots() -> list[Path]:
    env = os.environ.get("SLERP_DASHBOARD_ROOTS") or os.environ.get("SLERP_OUTPUT_ROOT") or ""
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_entry(folder: Path, dag_id: str, run_id: str) -> MergeEntry:
    """The entry of one merge folder; a corrupt manifest gives an unreadable entry."""
    entry = MergeEntry(dag_id=dag_id, run_id=run_id, output=str(folder))
    try:
        man = _read(folder, "merge_manifest.json")
        if not isinstance(man, dict):
            raise ValueError("merge_manifest.json is missing or not an object")
        spec, inputs = man.get("spec") or {}, man.get("inputs") or {}
        entry.created_at = man.get("created_at")
        entry.t = spec.get("t")
        entry.DOT_THRESHOLD = spec.get("DOT_THRESHOLD")
        entry.parents = [Parent(**{k: inputs[r].get(k) for k in ("ref", "revision", "commit")})
                         for r in ("model_1", "model_2") if r in inputs]
        report = _read(folder, "validation.json")
        if isinstance(report, dict):
            entry.validation = "passed" if report.get("passed") else "failed"
            entry.perplexity = {k: float(v) for k, v in
                                ((report.get("functional") or {}).get("perplexity") or {}).items()}
        up = _read(folder, PUBLISH_RECORD)
        if isinstance(up, dict) and up.get("published"):
            entry.hub_repo, entry.hub_commit, entry.hub_url = up.get("repo"), up.get("commit"), up.get("url")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        entry.readable = False
        entry.error = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return entry


def collect_merges(search: list[Path] | None = None) -> list[MergeEntry]:
    """Every merge under the roots, newest first."""
    entries = []
    for root in search if search is not None else roots():
        if not root.is_dir():
            continue
        for folder in sorted(root.glob("*/*/merged*")):
            if folder.is_dir() and not folder.name.endswith(".partial"):
                entries.append(load_entry(folder, folder.parent.parent.name, unquote(folder.parent.name)))
    return sorted(entries, key=lambda e: (e.created_at or "", e.output), reverse=True)


def sweep_points(entries: list[MergeEntry]) -> dict[tuple[str, str], list[MergeEntry]]:
    """Runs with more than one merge (sweeps), each with its merges sorted by t."""
    runs: dict[tuple[str, str], list[MergeEntry]] = {}
    for e in entries:
        if e.readable and isinstance(e.t, (int, float)):
            runs.setdefault((e.dag_id, e.run_id), []).append(e)
    return {k: sorted(v, key=lambda e: e.t) for k, v in runs.items() if len(v) > 1}


def sweep_svg(points: list[MergeEntry]) -> str:
    """Perplexity of the merge against t, with the parents as horizontal lines (SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    ts = [p.t for p in points if "merged" in p.perplexity]
    ppl = [p.perplexity["merged"] for p in points if "merged" in p.perplexity]
    ax.plot(ts, ppl, marker="o", color="#1f6feb", label="merged")
    for role, color in (("model_1", "#8250df"), ("model_2", "#bf3989")):
        values = [p.perplexity[role] for p in points if role in p.perplexity]
        if values:
            label = f"{role} (t={0 if role == 'model_1' else 1})"
            ax.axhline(values[0], linestyle="--", color=color, label=label)
    for p in points:
        if p.validation == "failed" and "merged" in p.perplexity:
            ax.plot([p.t], [p.perplexity["merged"]], marker="x", color="#cf222e", markersize=10)
    ax.set_xlabel("t")
    ax.set_ylabel("perplexity")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def _fmt_t(t: Any) -> str:
    if isinstance(t, (int, float)):
        return f"{t:.3f}".rstrip("0").rstrip(".") if t not in (0, 1) else str(int(t))
    return "schedule" if t is not None else "–"


def _fmt_ppl(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.2f}"


def _cell(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>'


def _row(e: MergeEntry) -> str:
    esc = html.escape
    run = (f"<a href={esc(e.run_link)!r} target=_top>{esc(e.dag_id)}<br>"
           f"<small>{esc(e.run_id)}</small></a>")
    if not e.readable:
        return (f'<tr class="unreadable">{_cell(esc(e.created_at or "–"))}{_cell(run)}'
                f'<td colspan="7">{esc(e.error or "unreadable")}<br><small>{esc(e.output)}</small></td>'
                f'{_cell("<span class=badge-bad>UNREADABLE</span>")}</tr>')
    parents = "<br>".join(
        f"{esc(p.ref)}<small>{'@' + esc(p.revision) if p.revision else ''}"
        f"{' · ' + esc(p.commit[:10]) if p.commit else ''}</small>" for p in e.parents)
    hub = "<small>not published</small>"
    if e.hub_url:
        hub = (f'<a href="{esc(e.hub_url)}" target="_blank">{esc(e.hub_repo)}<br>'
               f'<small>{esc((e.hub_commit or "")[:10])}</small></a>')
    badge = {"passed": "<span class=badge-ok>PASS</span>", "failed": "<span class=badge-bad>FAIL</span>"}.get(
        e.validation, "<span class=badge-none>–</span>")
    ppl = e.perplexity
    return (
        f'<tr class="{e.validation}">'
        f'{_cell(esc((e.created_at or "–").replace("T", " ").replace("+00:00", " UTC")))}'
        f"{_cell(run)}{_cell(parents)}"
        f'{_cell(_fmt_t(e.t), "num")}'
        f'{_cell(str(e.DOT_THRESHOLD) if e.DOT_THRESHOLD is not None else "–", "num")}'
        f'{_cell(_fmt_ppl(ppl.get("merged")), "num strong")}'
        f'{_cell(_fmt_ppl(ppl.get("model_1")), "num")}{_cell(_fmt_ppl(ppl.get("model_2")), "num")}'
        f"{_cell(hub)}{_cell(badge)}"
        f'</tr><tr class="path"><td></td><td colspan="9"><small>{esc(e.output)}</small></td></tr>'
    )


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1f2328;font-size:14px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}.muted{color:#656d76}
table{border-collapse:collapse;width:100%}
th,td{padding:6px 8px;border-bottom:1px solid #d0d7de;vertical-align:top;text-align:left}
th{background:#f6f8fa;font-weight:600;white-space:nowrap}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.strong{font-weight:600}tr.path td{border-bottom:1px solid #d0d7de;padding-top:0;color:#656d76}
tr.failed,tr.unreadable{background:#fff5f5}small{color:#656d76}a{color:#0969da;text-decoration:none}
.badge-ok,.badge-bad,.badge-none{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;
font-weight:600}.badge-ok{background:#dafbe1;color:#116329}.badge-bad{background:#ffebe9;color:#a40e26}
.badge-none{background:#eaeef2;color:#57606a}
.sweeps{display:flex;flex-wrap:wrap;gap:16px}.sweep{border:1px solid #d0d7de;border-radius:6px;padding:8px}
"""


def render_page(entries: list[MergeEntry], title: str = "SLERP merges") -> str:
    """The whole dashboard page (server-rendered HTML, inline SVG plots)."""
    rows = "".join(_row(e) for e in entries) or '<tr><td colspan="10" class="muted">no merges yet</td></tr>'
    sweeps = sweep_points(entries)
    plots = "".join(
        f'<div class="sweep"><div><b>{html.escape(d)}</b> <small>{html.escape(r)}</small></div>'
        f"{sweep_svg(pts)}</div>" for (d, r), pts in sweeps.items()
    )
    failed = sum(e.validation == "failed" or not e.readable for e in entries)
    searched = html.escape(", ".join(map(str, roots())) or "none")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="muted">{len(entries)} merge(s), {failed} failed or unreadable · roots: {searched}</div>
{"<h2>Sweeps: perplexity against t</h2><div class=sweeps>" + plots + "</div>" if plots else ""}
<h2>Merges</h2>
<table><thead><tr><th>When</th><th>DAG run</th><th>Parents (revision · commit)</th><th class="num">t</th>
<th class="num">DOT_THR.</th><th class="num">ppl merged</th><th class="num">ppl model 1</th>
<th class="num">ppl model 2</th><th>Hub</th><th>Validation</th></tr></thead><tbody>{rows}</tbody></table>
</body></html>"""


def create_app(search: list[Path] | None = None):
    """The FastAPI app the Airflow plugin mounts (``search`` overrides the roots, for tests)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="SLERP merges", docs_url=None, redoc_url=None)

    def entries() -> list[MergeEntry]:
        return collect_merges(search)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return render_page(entries())

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_page(dag_id: str, run_id: str) -> str:
        chosen = [e for e in entries() if e.dag_id == dag_id and e.run_id == run_id]
        return render_page(chosen, title=f"SLERP merge of {dag_id} / {run_id}")

    @app.get("/api/merges")
    def api_merges() -> list[dict]:
        return [e.model_dump() | {"run_link": e.run_link} for e in entries()]

    @app.get("/plot/{dag_id}/{run_id}.svg")
    def plot(dag_id: str, run_id: str) -> Response:
        pts = sweep_points(entries()).get((dag_id, run_id))
        if not pts:
            raise HTTPException(404, f"no sweep for {dag_id}/{run_id}")
        return Response(sweep_svg(pts), media_type="image/svg+xml")

    return app
