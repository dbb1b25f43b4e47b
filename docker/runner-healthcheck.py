"""Docker healthcheck for the `atr serve` runner (standard library only, so it costs no imports).

Healthy means: the Prefect API at $PREFECT_API_URL answers /health, and a deployment named
$ATR_DEPLOYMENT_NAME is registered there (that is what `atr serve` does at start-up; without a
name, any deployment counts). Exit 0 when healthy, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5


def _request(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    auth = os.environ.get("PREFECT_API_AUTH_STRING")  # self-hosted basic auth, "user:password"
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.load(response)


def check(api_url: str, deployment_name: str) -> tuple[bool, str]:
    api = api_url.rstrip("/")
    if not api:
        return False, "PREFECT_API_URL is not set"
    try:
        _request(f"{api}/health")
        name_filter = {"deployments": {"name": {"any_": [deployment_name]}}} if deployment_name else {}
        count = _request(f"{api}/deployments/count", name_filter)
    except urllib.error.HTTPError as exc:  # before URLError, its base class
        return False, f"Prefect API {api} answered {exc.code} {exc.reason} to {exc.url}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"Prefect API {api} unreachable: {exc}"
    if not isinstance(count, int) or count < 1:
        what = f"deployment {deployment_name!r}" if deployment_name else "deployment"
        return False, f"no {what} registered at {api} yet"
    return True, f"Prefect API {api} up, {count} deployment(s) named {deployment_name or '*'}"


def main() -> int:
    healthy, message = check(os.environ.get("PREFECT_API_URL", ""), os.environ.get("ATR_DEPLOYMENT_NAME", ""))
    print(("healthy: " if healthy else "unhealthy: ") + message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
