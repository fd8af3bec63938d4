"""Airflow UI extension: the "SLERP merges" page (nav) and a "Merge" tab on DAG run pages.

Serves slerp_plugin.integrations.airflow.dashboard's FastAPI app under /slerp on the API server; it reads the
manifests and validation reports under $SLERP_DASHBOARD_ROOTS (default $SLERP_OUTPUT_ROOT).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from slerp_plugin.integrations.airflow.dashboard import create_app


class SlerpDashboardPlugin(AirflowPlugin):
    name = "slerp_dashboard"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/slerp", "name": "SLERP merges"}]
    external_views = [
        {"name": "SLERP merges", "href": "/slerp/", "destination": "nav", "url_route": "slerp_merges",
         "category": "browse"},
        {"name": "Merge", "href": "/slerp/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "slerp_merge_of_run"},
    ]
