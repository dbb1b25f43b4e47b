"""Print a .env for the atr compose stack with fresh random secrets: python3 docker/make-env.py > .env

Standard library only. Nothing in the repository holds a password; compose refuses to start until
.env (or the environment) sets each of these. The file is written with mode 0600 when stdout is a file.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys


def env_text(user: str = "atr") -> str:
    token = lambda: secrets.token_urlsafe(24)  # noqa: E731
    lines = {
        "POSTGRES_PASSWORD": token(),
        "PREFECT_API_AUTH_STRING": f"{user}:{token()}",
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": token(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": token(),
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


if __name__ == "__main__":
    try:
        if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            os.fchmod(sys.stdout.fileno(), 0o600)
    except OSError:
        pass
    sys.stdout.write(env_text())
