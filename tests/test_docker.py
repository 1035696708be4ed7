"""The Dockerfile, read and then run step by step without Docker (no engine runs on these machines).

What is mirrored: the pip RUN line installs requirements.txt into a virtualenv (`python -m venv`, no
system site packages) made from a Python 3.11 like the image's; the project is copied as `COPY . .`
copies it (minus .dockerignore); the server runs the CMD's arguments with the ENV variables, as an
unprivileged user (uid 65534 when the test runs as root, as `USER app` does) that may write only the
cache volume and its home; the HEALTHCHECK command is polled until it passes; then the app's landing
page is rendered by that install. Not mirrored: the base image itself and `useradd`.

Which virtualenv: the install is the slow step (~4-5 min on the 2-core machine, as long as a third of
the suite), and the suite itself already runs in a virtualenv that `pip install -r requirements.txt`
built (the README's command, CI's too). So by default the server runs from the suite's own
environment when that is a virtualenv without system site packages whose every package matches its
pin in requirements.txt (checked, and the test says which it used); as root, from a hard-linked copy
that the unprivileged user can read (CI's virtualenv sits in a 0700 temp dir). SPARSITY_APP_DOCKER_FRESH=1
runs the Dockerfile's own pip line into a new virtualenv instead, kept under the temp dir and keyed by
requirements.txt, the pip line and the interpreter (rebuilt whenever any changes); so does an
environment off its pins. pip's own cache may serve the wheels (the test drops `--no-cache-dir`, which
only keeps the image small) and PIP_RETRIES=0 makes an unreachable extra index (download.pytorch.org
here) fail fast instead of retrying for minutes; the local CPU torch wheel satisfies the pin. The
server is started as `python -m streamlit`, not through the `streamlit` script, whose #! line names
the interpreter of the virtualenv it was installed into.
"""
import fnmatch
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from filelock import FileLock

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOBODY = 65534


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _one(instructions, name: str) -> str:
    found = [args for word, args in instructions if word == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def test_the_dockerfile_says_what_the_issue_asks():
    ins = _instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    words = [w for w, _ in ins]
    pip = next(args for w, args in ins if w == "RUN" and args.startswith("pip install"))
    assert "-r requirements.txt" in pip and "--extra-index-url https://download.pytorch.org/whl/cpu" in pip
    user = _one(ins, "USER")
    assert user not in ("root", "0") and words.index("USER") < words.index("CMD")
    assert f"useradd" in " ".join(args for w, args in ins if w == "RUN")
    env = dict(kv.split("=", 1) for kv in shlex.split(" ".join(args for w, args in ins if w == "ENV")))
    assert env["SPARSITY_APP_CACHE_DIR"] == "/app/cache" and _one(ins, "VOLUME") == "/app/cache"
    assert _one(ins, "WORKDIR") == "/app" and _one(ins, "EXPOSE") == "8501"
    assert json.loads(_one(ins, "CMD")) == ["streamlit", "run", "app.py", "--server.address=0.0.0.0",
                                            "--server.port=8501", "--server.headless=true"]
    health = _one(ins, "HEALTHCHECK")
    assert "CMD python -c" in health and "/_stcore/health" in health and "curl" not in health
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "cache/*"} <= set(ignored)


def _python311() -> str | None:
    """A Python 3.11 that the unprivileged user can run (the image's own is /usr/local/bin/python3.11)."""
    for candidate in (os.environ.get("SPARSITY_APP_DOCKER_PYTHON"), "/usr/local/bin/python3.11", "/usr/bin/python3.11",
                      getattr(sys, "_base_executable", sys.executable)):
        if not candidate or not os.path.exists(candidate):
            continue
        probe = subprocess.run([*_as_user(), candidate, "-c", "import sys, venv, ensurepip; "
                                "assert sys.version_info[:2] == (3, 11)"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def _as_user() -> list[str]:
    """The prefix that runs a command as the unprivileged user (nothing when the test is not root)."""
    return (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
            if os.geteuid() == 0 else [])


def _fresh_venv(python: str, pip_line: str) -> tuple[pathlib.Path, str]:
    """The virtualenv that `python -m venv` + the Dockerfile's pip line build; built once per key."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    version = subprocess.run([python, "-VV"], capture_output=True, text=True).stdout.strip()
    key = hashlib.sha256(requirements + pip_line.encode() + python.encode() + version.encode()).hexdigest()[:16]
    venv = _home() / f"venv-{key}"
    with FileLock(str(_home() / "build.lock")):
        if os.environ.get("SPARSITY_APP_DOCKER_FRESH") and venv.exists():
            shutil.rmtree(venv)
        if not (venv / "installed.json").exists():
            for old in _home().glob("venv-*"):  # another requirements.txt's: 2.5 GB each
                shutil.rmtree(old, ignore_errors=True)
            start = time.monotonic()
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            args = shlex.split(pip_line)
            assert args[:2] == ["pip", "install"]
            args = [str(venv / "bin" / "pip"), *[a for a in args[1:] if a != "--no-cache-dir"]]
            done = subprocess.run(args, cwd=ROOT, env={**os.environ, "PIP_RETRIES": "0"}, capture_output=True,
                                  text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            (venv / "installed.json").write_text(json.dumps({"seconds": round(time.monotonic() - start, 1),
                                                             "pip": args, "python": version}))
    built = json.loads((venv / "installed.json").read_text())
    return venv, f"a fresh virtualenv {venv.name}, installed by the Dockerfile's pip line in {built['seconds']} s"


def _home() -> pathlib.Path:
    home = pathlib.Path(tempfile.gettempdir()) / "sparsity-app-docker"
    home.mkdir(mode=0o755, exist_ok=True)
    return home


def _off_pins() -> list[str]:
    """The pins of requirements.txt that this interpreter's environment does not hold, as 'name: have != want'
    (a local version label such as torch's +cpu aside), plus why it is not a plain virtualenv if it is not."""
    from importlib.metadata import PackageNotFoundError, version

    off = []
    if sys.prefix == sys.base_prefix:
        off.append("not a virtualenv")
    elif "include-system-site-packages = true" in (pathlib.Path(sys.prefix) / "pyvenv.cfg").read_text().lower():
        off.append("a virtualenv that sees the system site packages")
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, want = line.partition("==")
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "missing"
        if have.split("+", 1)[0] != want:
            off.append(f"{name}: {have} != {want}")
    return off


def _suite_venv(python: str) -> tuple[pathlib.Path, str] | None:
    """The suite's own virtualenv when it holds exactly requirements.txt and runs `python`'s version (else None);
    as root, a hard-linked copy of it under the temp dir that uid 65534 can read, made once per environment."""
    off = _off_pins()
    if off or sys.version_info[:2] != (3, 11):
        return None
    venv = pathlib.Path(sys.prefix)
    if os.geteuid() != 0:
        return venv, f"the suite's own virtualenv {venv} (every pin of requirements.txt checked)"
    key = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + str(venv).encode()).hexdigest()[:16]
    copy = _home() / f"suite-{key}"
    with FileLock(str(_home() / "build.lock")):
        if not (copy / "pyvenv.cfg").exists():
            for old in _home().glob("suite-*"):
                shutil.rmtree(old, ignore_errors=True)
            tmp = _home() / f"suite-{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            linked = subprocess.run(["cp", "-al", str(venv), str(tmp)], capture_output=True)
            if linked.returncode != 0:  # another file system: a plain copy
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(venv, tmp, symlinks=True)
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink())]:
                d.chmod(d.stat().st_mode | 0o555)
            tmp.rename(copy)
    runs = subprocess.run([*_as_user(), str(copy / "bin" / "python"), "-c", "import streamlit, torch, tvm"],
                          capture_output=True)
    if runs.returncode != 0:  # e.g. its interpreter lives where uid 65534 may not go: the fresh install instead
        return None
    return copy, f"the suite's own virtualenv {venv} (every pin of requirements.txt checked), as a copy uid 65534 can read"


def _copy_context(dest: pathlib.Path) -> None:
    """`COPY . .`: the project without what .dockerignore names (a pattern also excludes what is below it)."""
    patterns = [p for p in (ROOT / ".dockerignore").read_text().split() if not p.startswith("#")]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
                   or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat.removeprefix("**/"))
                   for p in prefixes for pat in patterns)

    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not ignored(rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_dockerfile_steps_serve_the_app_in_a_fresh_virtualenv():
    ins = _instructions()
    python = _python311()
    if python is None:
        pytest.skip("no Python 3.11 that an unprivileged user can run (set SPARSITY_APP_DOCKER_PYTHON)")
    pip_line = next(args for w, args in ins if w == "RUN" and args.startswith("pip install"))
    mirrored = None if os.environ.get("SPARSITY_APP_DOCKER_FRESH") else _suite_venv(python)
    venv, which = mirrored or _fresh_venv(python, pip_line)
    print(f"serving from {which}")

    app = pathlib.Path(tempfile.mkdtemp(prefix="sparsity-app-image-"))  # the image's /app, world-readable
    server = None
    try:
        app.chmod(0o755)
        _copy_context(app)
        for d in ("cache", "home", "tmp"):  # the volume, the user's home, the container's own /tmp
            (app / d).mkdir(exist_ok=True)
            if os.geteuid() == 0:
                os.chown(app / d, NOBODY, NOBODY)
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(app / "home"), "LANG": "C.UTF-8",
               "SPARSITY_APP_LOCK_DIR": str(app / "tmp" / "measure"), "TMPDIR": str(app / "tmp")}
        for args in (args for w, args in ins if w == "ENV"):
            env.update(kv.split("=", 1) for kv in shlex.split(args.replace("/app", str(app))))
        port = _free_port()
        cmd = [a.replace("--server.port=8501", f"--server.port={port}") for a in json.loads(_one(ins, "CMD"))]
        assert cmd[0] == "streamlit"
        log = open(app / "tmp" / "server.log", "w")
        server = subprocess.Popen([*_as_user(), str(venv / "bin" / "python"), "-m", *cmd], cwd=app, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        health = shlex.split(_one(ins, "HEALTHCHECK").split(" CMD ", 1)[1])
        health = [str(venv / "bin" / "python") if a == "python" else a.replace(":8501/", f":{port}/") for a in health]
        start = time.monotonic()
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, (app / "tmp" / "server.log").read_text()[-3000:]
            assert time.monotonic() - start < 120, "the HEALTHCHECK did not pass within 120 s"
            time.sleep(1)
        with open(f"/proc/{server.pid}/status") as f:  # the server really runs unprivileged
            uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
        assert os.geteuid() != 0 or int(uid) == NOBODY
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=10)
        assert page.status == 200 and "_streamlit_xsrf=" in (page.headers.get("Set-Cookie") or "")  # XSRF is on

        render = subprocess.run(  # the landing page, rendered by this install as this user
            [*_as_user(), str(venv / "bin" / "python"), "-c",
             "from streamlit.testing.v1 import AppTest; at = AppTest.from_file('app.py', default_timeout=300).run(); "
             "assert not at.exception, at.exception; print(at.title[0].value)"],
            cwd=app, env=env, capture_output=True, text=True, timeout=600)
        assert render.returncode == 0, render.stderr[-3000:]
        assert "Explore a layer" in render.stdout
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(app, ignore_errors=True)
