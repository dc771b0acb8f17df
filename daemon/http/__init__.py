"""The HTTP API: Starlette routes served by Uvicorn inside the daemon's process.

- `routes.make_app` assembles the one route table from the groups below and wraps it in the middleware;
- `ops` (`/metrics`, `/healthz`, `/readyz`, `/openapi.json`), `tfserving` (TF Serving REST, `/v1/models/...`),
  `kserve` (KServe v2 / Open Inference Protocol, `/v2/...`): each module exports `ROUTES`, a list of Starlette
  routes; a new group is one more module in `routes.ROUTE_GROUPS`, and gets every middleware rule;
- `security` (Host, bearer token, cross-site refusal, case-insensitive protocol paths), `observe` (request
  metrics), `errors` (JSON errors), `body` (size- and time-limited bodies, hostile JSON refused);
- `api.Api`: what the routes need from the daemon (models by version or label, decoding, the batcher);
- `server.HttpServer`: Uvicorn on its own event loop in the named thread `retraind-http`.
"""

MODEL_NAME = "retraind"
