"""The parts of the MLflow REST sink (private; the public face is :mod:`steplog.sinks.mlflow_rest`).

* :mod:`.retry`: which failures are transient, the backoff, and the one retry loop.
* :mod:`.encode`: pure ``runs/log-batch`` encoding within the server's limits.
* :mod:`.options`: MLflow's environment variables and the URL's credentials as httpx options; redaction.
* :mod:`.client`: :class:`~.client.RestClient`, the few REST calls, each answer checked.
* :mod:`.outage`: the backlog kept while the server does not acknowledge, and the journal it spills to.
"""
