"""The HTTP stacks considered for the daemon, on the same two trivial routes, each in its own process on one
worker (as the daemon runs one), loaded by ApacheBench over loopback: `GET /ping` (a small JSON answer) and
`POST /echo` (a 10 KB body read whole, its length answered as JSON), 16 concurrent clients.

Stacks: Starlette on Uvicorn with httptools (chosen), aiohttp's own server, Starlette on Granian (Rust HTTP,
ASGI; measured only where the `granian` package is installed: it is not a dependency). Figures are requests/s
and ratios against the chosen stack in the same run; the engine's work dwarfs them all (a forward pass is
about 5-14 ms, one of these requests well under 1 ms), so they decide nothing alone: see the README.

Usage: python bench/http_servers.py [--requests 4000]"""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import harness

STARLETTE = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def ping(request):
    return JSONResponse({"ok": True})

async def echo(request):
    return JSONResponse({"bytes": len(await request.body())})

app = Starlette(routes=[Route("/ping", ping), Route("/echo", echo, methods=["POST"])])
"""
SERVERS = {
    "uvicorn": STARLETTE + """
import sys, uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", log_level="warning",
            access_log=False, lifespan="off")
""",
    "aiohttp": """
import sys
from aiohttp import web

async def ping(request):
    return web.json_response({"ok": True})

async def echo(request):
    return web.json_response({"bytes": len(await request.read())})

app = web.Application()
app.add_routes([web.get("/ping", ping), web.post("/echo", echo)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
""",
    "granian": STARLETTE + """
import sys
from granian import Granian
from granian.constants import Interfaces
Granian("__main__:app", address="127.0.0.1", port=int(sys.argv[1]), interface=Interfaces.ASGI, workers=1,
        log_enabled=False).serve()
""",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests_per_second(url: str, requests: int, body: Path | None) -> float:
    command = ["ab", "-q", "-r", "-n", str(requests), "-c", "16"]
    if body is not None:
        command += ["-p", str(body), "-T", "application/octet-stream"]
    out = subprocess.run([*command, url], capture_output=True, text=True, timeout=300, check=True).stdout
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    if failed:
        harness.note(f"{url}: {failed} failed requests")
    return float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def measure(name: str, source: str, requests: int, body: Path) -> dict[str, float]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(textwrap.dedent(source))
    server = subprocess.Popen([sys.executable, script.name, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        requests_per_second(f"http://127.0.0.1:{port}/ping", 200, None)  # warm-up
        return {"ping": requests_per_second(f"http://127.0.0.1:{port}/ping", requests, None),
                "echo": requests_per_second(f"http://127.0.0.1:{port}/echo", requests, body)}
    finally:
        server.terminate()
        server.wait(10)
        Path(script.name).unlink()


def main() -> None:
    args = harness.arguments(__doc__, requests=4000).parse_args()
    harness.header("http_servers", requests=args.requests)
    with harness.scratch("servers") as root:
        body = root / "body.bin"
        body.write_bytes(b"x" * 10_000)
        results = {}
        for name, source in SERVERS.items():
            if name == "granian" and importlib.util.find_spec("granian") is None:
                harness.note("granian is not installed: skipped")
                continue
            results[name] = measure(name, source, args.requests, body)
    for name, figures in results.items():
        for route, value in figures.items():
            base = results["uvicorn"][route]
            harness.emit(f"servers.{name}.{route}", value, "req/s", ratio=value / base, vs=f"servers.uvicorn.{route}")


if __name__ == "__main__":
    main()
