"""A retraind result sink that POSTs each classification record, as JSON, to the URL in its settings:

```yaml
plugins:
  webhook: {url: "http://127.0.0.1:8080/retraind", timeout_seconds: 5}
```

Nothing is sent while `url` is empty (the default). The body is the record retraind writes to
`results.jsonl`; the `Idempotency-Key` header carries its `id`. retraind may call a sink twice for one result
after a crash, so a receiver should ignore an id it has seen. A failed POST raises: retraind logs it, counts it
in `retraind_plugin_errors_total{plugin="webhook"}`, and the other sinks still run. The POST runs on the
pipeline thread, so `timeout_seconds` bounds how long a slow receiver can hold up classification.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.results import ClassificationResult

__version__ = "0.2.0"


@dataclass(frozen=True)
class WebhookSettings:
    """`plugins.webhook` in retraind's config."""

    url: str = ""  # where to POST each record (http:// or https://); empty: send nothing
    timeout_seconds: float = 5.0  # how long one POST may take


class Webhook:
    """The plugin: one object, so its settings live with it (retraind hands them over at start and reload)."""

    def __init__(self) -> None:
        self.settings = WebhookSettings()

    @hookimpl
    def retraind_register_settings(self) -> type[WebhookSettings]:
        return WebhookSettings

    @hookimpl
    def retraind_configure(self, settings: WebhookSettings) -> None:
        parts = urllib.parse.urlsplit(settings.url)
        if settings.url and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise ValueError(f"url: {settings.url!r} is not an http:// or https:// URL")
        if not 0 < settings.timeout_seconds <= 600:
            raise ValueError(f"timeout_seconds: {settings.timeout_seconds} is out of range (0, 600]")
        self.settings = settings

    @hookimpl
    def retraind_on_result(self, result: ClassificationResult, config: Config) -> None:
        url = self.settings.url
        if not url:
            return
        request = urllib.request.Request(
            url, data=json.dumps(result.record()).encode(), method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": result.id,
                     "User-Agent": f"retraind-webhook/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection open
            raise RuntimeError(f"webhook {url} answered {exc.code} {exc.reason}") from None


#: What the `retraind` entry point names.
plugin = Webhook()
