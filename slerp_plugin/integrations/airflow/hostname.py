"""The host name Airflow records for a task (``[core] hostname_callable``).

Several workers on one machine report the same host name, so nobody can tell from a task instance
which worker ran it. The local cluster gives each worker a name in ``SLERP_HOSTNAME``; without it
this is Airflow's default (the FQDN). Imports nothing heavy: every Airflow process calls it.
"""

from __future__ import annotations

import os


def hostname() -> str:
    """``$SLERP_HOSTNAME`` when set, else Airflow's default (``airflow.utils.net.getfqdn``)."""
    name = os.environ.get("SLERP_HOSTNAME", "").strip()
    if name:
        return name
    from airflow.utils.net import getfqdn

    return getfqdn()
