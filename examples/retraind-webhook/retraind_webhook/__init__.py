"""A retraind result sink that POSTs each classification record, as JSON, to the URL in
`RETRAIND_WEBHOOK_URL` (nothing is sent while it is unset).

The body is the record retraind writes to `results.jsonl`; the `Idempotency-Key` header carries its `id`.
retraind may call a sink twice for one result after a crash, so a receiver should ignore an id it has seen.
A failed POST raises: retraind logs it, counts it in `retraind_plugin_errors_total{plugin="webhook"}`, and the
other sinks still run. The POST runs on the pipeline thread, so `RETRAIND_WEBHOOK_TIMEOUT` (seconds, default
5) bounds how long a slow receiver can hold up classification.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.results import ClassificationResult

__version__ = "0.1.0"


@hookimpl
def retraind_on_result(result: ClassificationResult, config: Config) -> None:
    url = os.environ.get("RETRAIND_WEBHOOK_URL")
    if not url:
        return
    request = urllib.request.Request(
        url, data=json.dumps(result.record()).encode(), method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": result.id,
                 "User-Agent": f"retraind-webhook/{__version__}"})
    timeout = float(os.environ.get("RETRAIND_WEBHOOK_TIMEOUT", "5"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection open
        raise RuntimeError(f"webhook {url} answered {exc.code} {exc.reason}") from None
