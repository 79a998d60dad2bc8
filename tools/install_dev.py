"""Install the project with its test extra into the running interpreter's venv, under the dev
pins (constraints-dev.txt), for `make install` / `make test` / CI.

uv installs it: on the 2-core CI machine pip took ~4 minutes of the 30 CI may use (one
process resolving, unpacking ~22,700 files and compiling them one after another), uv ~1.5
(parallel unpack and bytecode compile). uv does not read pip's configuration, and this
machine's pip is configured to take torch and the other large wheels from local disk, so the
index, find-links, constraint and certificate settings are carried over from `pip config
list` (never an index pip would not use: an unpinned torch from PyPI is a multi-GB CUDA
download). If uv cannot be installed or fails, pip installs as before.

Usage: python tools/install_dev.py   (run with the venv's python)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = ["-c", str(REPO / "constraints-dev.txt"), "-e", f"{REPO}[test]"]


def pip_settings() -> dict[str, list[str]]:
    """pip's effective settings, ``{name: [values]}`` (``find-links``, ``extra-index-url``,
    ...), the environment's (PIP_*) over the configuration files'."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    by_origin: dict[str, dict[str, list[str]]] = {"file": {}, "env": {}}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, name = key.rpartition(".")
        if section not in ("global", "install", ":env:"):
            continue
        by_origin["env" if section == ":env:" else "file"][name] = shlex.split(value)[0].split() if value else []
    return by_origin["file"] | by_origin["env"]


def uv_command(settings: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable, "-q",
           "--compile-bytecode", "--index-strategy", "unsafe-best-match"]
    env = dict(os.environ)
    # pip reads a flag's value as a boolean ("no-index = false" leaves the index on).
    if settings.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        cmd.append("--no-index")
    for url in settings.get("index-url", []):
        cmd += ["--index-url", url]
    for url in settings.get("extra-index-url", []):
        cmd += ["--extra-index-url", url]
    for place in settings.get("find-links", []):
        cmd += ["--find-links", place]
    for path in settings.get("constraint", []):
        cmd += ["-c", path]
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"][0]
    if settings.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = settings["default-timeout"][0]
    # Beside the venv (same file system: uv hard-links from it), removed with it.
    env.setdefault("UV_CACHE_DIR", str(Path(sys.prefix) / ".uv-cache"))
    return cmd + TARGET, env


def main() -> int:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    try:
        subprocess.run(pip + ["uv"], check=True)
        cmd, env = uv_command(pip_settings())
        subprocess.run(cmd, env=env, check=True)
        return 0
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"install_dev: uv could not install ({exc}); installing with pip", file=sys.stderr)
    return subprocess.run(pip + TARGET).returncode


if __name__ == "__main__":
    sys.exit(main())
