"""`retraind status`: what the daemon is doing, asked over its HTTP API, or read from the state dir when no
daemon answers. Both give the same dict: `source`, `model` (None before the first training), `images` per
label and split, `inbox_pending`, `last_training` (a Unix time or None), `training_runs` and `migration` (daemon
only: None, or the backbone migration under way, `daemon.migration`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.atomic import TMP_PREFIX
from daemon.config import Config
from daemon.http import MODEL_NAME
from daemon.http.security import read_token
from daemon.ignore import IgnoreRules
from daemon.registry import ModelRegistry
from daemon.scanner import walk_files
from daemon.split import SPLITS

_TIMEOUT = 10.0


class DaemonUnavailable(Exception):
    """No daemon answers on the configured HTTP address."""



def files_waiting(count: int) -> str:
    """`1 file waiting`, `3 files waiting`: the inbox's backlog in `retraind status` and the systemd STATUS line."""
    return f"{count} file waiting" if count == 1 else f"{count} files waiting"

def api_url(config: Config) -> str:
    """Where the daemon listens, as a client reaches it (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.http.host, config.http.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.http.port}"


def request(config: Config, path: str, method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of one API call; raises DaemonUnavailable when nothing answers."""
    url = api_url(config) + path
    headers = {"Authorization": f"Bearer {token.decode()}"} if (token := read_token(config.http)) else {}
    body = None
    if method != "GET":  # state-changing routes take JSON only
        body, headers["Content-Type"] = b"{}", "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method),
                                    timeout=_TIMEOUT) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DaemonUnavailable(f"no daemon answers at {api_url(config)} ({reason}); is it running?") from exc


def _model(version: int, backbone: str, labels: list[str], accuracy: dict[str, Any],
           trust: dict[str, Any] | None) -> dict[str, Any]:
    return {"version": version, "backbone": backbone, "labels": labels, "accuracy": accuracy, "trust": trust}


def from_daemon(config: Config) -> dict[str, Any]:
    code, body = request(config, f"/v1/models/{MODEL_NAME}/metadata")
    meta = json.loads(body) if code == 200 else None
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(request(config, "/metrics")[1].decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    images: dict[str, dict[str, int]] = {}
    for labels, value in samples.get("retraind_images", []):
        images.setdefault(labels["label"], dict.fromkeys(SPLITS, 0))[labels["split"]] = int(value)
    last = samples.get("retraind_last_training_timestamp_seconds", [({}, 0.0)])[0][1]
    return {
        "source": f"daemon at {api_url(config)}",
        "model": meta and _model(int(meta["model_spec"]["version"]), meta["backbone"], meta["labels"],
                                 meta["accuracy"], meta.get("trust")),
        "images": images or (meta or {}).get("images") or {},
        "inbox_pending": int(samples.get("retraind_inbox_pending_files", [({}, 0.0)])[0][1]),
        "last_training": last or None,
        "training_runs": {labels["result"]: int(v) for labels, v in samples.get("retraind_training_runs_total", [])},
        "migration": _migration(samples),
    }


def _migration(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, Any] | None:
    """The backbone migration the daemon's metrics show, or None."""
    info = [labels for labels, value in samples.get("retraind_migration_info", []) if value]
    if not info:
        return None
    images = {labels["state"]: int(value) for labels, value in samples.get("retraind_migration_images", [])}
    return {"source": info[0]["source"], "target": info[0]["target"], "serving": info[0]["serving"] == "true",
            "cached": images.get("cached", 0), "total": images.get("total", 0)}


def from_state(config: Config) -> dict[str, Any]:
    version = ModelRegistry.of(config).current()
    m = version.metrics if version else {}
    ignored = IgnoreRules(config.watch.ignore).name
    inbox = [p for p in walk_files(config.folder("inbox"), ignored) if not p.name.startswith(TMP_PREFIX)]
    return {
        "source": f"state dir {config.folder('state')} (no daemon answers at {api_url(config)})",
        "model": version and _model(version.number, version.backbone, list(version.labels), m.get("accuracy", {}),
                                    m.get("trust")),
        "images": m.get("images", {}),
        "inbox_pending": len(inbox),
        "last_training": m.get("created"),
        "training_runs": None,
        "migration": None,
    }


def gather(config: Config) -> dict[str, Any]:
    try:
        return from_daemon(config)
    except DaemonUnavailable:
        return from_state(config)


def percent(value: float | None) -> str:
    """An accuracy for people: `93.8%`, or a dash where nothing was measured (an empty split)."""
    return "–" if value is None else f"{100 * float(value):.1f}%"


def trust_lines(trust: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(name, text) lines about a version's filing: target precision, threshold and expected coverage,
    calibration error before → after, novelty threshold; or why everything goes to review."""
    if not trust:
        return [("filing", "every image goes to review: this model version has no calibration (retrain it)")]
    calibration = trust["calibration"]
    errors = "  ".join(f"{split} {percent(pair['before'])} → {percent(pair['after'])}"
                       for split, pair in calibration.items() if isinstance(pair, dict) and "before" in pair
                       and pair["before"] is not None)
    parameters = ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                           for name, value in dict(calibration["parameters"] or {}).items())
    if trust["confidence_threshold"] is None:
        filing = f"suspended: {trust['reason']}"
    else:
        filing = (f"target precision {percent(trust['target_precision'])}, review below calibrated score "
                  f"{trust['confidence_threshold']:.3f}, expected coverage {percent(trust['expected_coverage'])}")
    return [("filing", filing),
            ("calibration", f"{calibration['method']} ({parameters}), error (ECE) {errors}"),
            ("novelty", f"{trust['novelty']['method']}, review above {trust['novelty']['threshold']:g}"
             + _novelty_rule(trust["novelty"]))]


def _novelty_rule(novelty: dict[str, Any]) -> str:
    """How the novelty threshold was set; empty for a version made before the rule was recorded."""
    if novelty.get("rule") == "false_alarm_rate":
        return f" (false-alarm rate {percent(novelty['false_alarm_rate'])} of known images)"
    return " (leave-one-class-out Youden's J)" if novelty.get("rule") else ""


def _ago(timestamp: float) -> str:
    seconds = max(0, int(time.time() - timestamp))
    span = f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(timestamp))} ({span} ago)"


def format_status(status: dict[str, Any]) -> str:
    model = status["model"]
    lines = [f"source:        {status['source']}"]
    if model is None:
        lines.append("model:         none yet (waiting for images of at least two labels)")
    else:
        lines.append(f"model:         version {model['version']}, {len(model['labels'])} labels, "
                     f"backbone {model['backbone']}")
        lines.append("accuracy:      " + "  ".join(f"{s} {percent(model['accuracy'].get(s))}" for s in SPLITS))
        lines += [f"{name + ':':<15}{text}" for name, text in trust_lines(model.get("trust"))]
    if status["last_training"]:
        lines.append(f"last training: {_ago(status['last_training'])}")
    if status["training_runs"] is not None:
        lines.append("training runs: " + ", ".join(f"{n} {r}" for r, n in sorted(status["training_runs"].items())))
    lines.append(f"inbox:         {files_waiting(status['inbox_pending'])}")
    if migration := status.get("migration"):
        meanwhile = "served meanwhile" if migration["serving"] else "another network: nothing is served meanwhile"
        lines.append(f"migration:     {migration['cached']} of {migration['total']} training images cached under "
                     f"{migration['target']}; the model of {migration['source']} is {meanwhile}")
    images = status["images"]
    if images:
        width = max(len("label"), *(len(label) for label in images))
        lines.append("")
        lines.append(f"{'label':<{width}}  " + "  ".join(f"{s:>10}" for s in SPLITS))
        for label, counts in sorted(images.items()):
            lines.append(f"{label:<{width}}  " + "  ".join(f"{counts.get(s, 0):>10}" for s in SPLITS))
    return "\n".join(lines)
