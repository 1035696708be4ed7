"""python -m sparsity_app loadtest: many browser sessions at once against a real `streamlit run app.py`.

Starts the app on 127.0.0.1 with a private cache and measurement-slot directory, opens `--sessions`
browser contexts in one headless Chromium (Playwright; one browser with N contexts costs far less
than N browsers on 2 cores) and has each press Run on `--runs` uncached single-layer
configurations of the Explore page, all sessions at once: each session's second run is one fixed
configuration with "Measure again and re-tune" ticked (so every session measures it afresh), the
others are distinct. Then it stops the server (also on failure or ^C) and checks, printing each figure:

- every run finished with a result on the page and in the cache, and none showed an error;
- the measurements never overlapped: the slot's measure.log intervals are pairwise disjoint;
- the median speedup (vs best dense) of the fixed configuration over the sessions, measured under
  that load, is within `--tolerance` of the median of `--quiet-runs` quiet measurements of it
  afterwards, each re-tuned as well (`run --retune`), with nothing else running.

Exit status 0 when every check holds, 1 otherwise, 2 for bad arguments. A benchmark, never a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from .errors import UserError
from .spec import Spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXED_LAYER = "encoder.layer.0.attention.self.query"
SQUARE_ROLES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=8, help="browser sessions at once (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="uncached runs each session submits (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="the app's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--tokens", type=int, default=128, help="tokens of every configuration (default %(default)s)")
    p.add_argument("--quiet-runs", type=int, default=3, help="quiet measurements of the fixed configuration")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative gap of the fixed configuration's "
                   "speedup, loaded vs quiet (default %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole load (default %(default)s)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--keep", action="store_true", help="keep the private directory (server log, cache, slot log)")


def configurations(sessions: int, runs: int, tokens: int) -> tuple[list[list[Spec]], Spec]:
    """(each session's runs, the fixed configuration): minilm-l6 384x384 layers; the fixed one is every session's
    second run (its only one with --runs 1), every other run a configuration of its own."""
    fixed = Spec(layer=FIXED_LAYER, block=(32, 1), sparsity=0.9, tokens=tokens)
    others = [Spec(layer=f"encoder.layer.{i}.{role}", block=block, sparsity=s, tokens=tokens)
              for s in (0.8, 0.9, 0.95) for block in ((32, 1), (16, 1)) for i in range(6) for role in SQUARE_ROLES]
    others = [s for s in others if s != fixed]
    if len(others) < sessions * (runs - 1):
        raise UserError(f"at most {len(others)} distinct configurations besides the fixed one: lower --sessions x --runs")
    at = min(1, runs - 1)
    plan = []
    for i in range(sessions):
        mine = others[i * (runs - 1):(i + 1) * (runs - 1)]
        plan.append(mine[:at] + [fixed] + mine[at:])
    return plan, fixed


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.sessions <= 32 or not 1 <= args.runs <= 10:
        raise UserError("--sessions must be in [1, 32] and --runs in [1, 10]")
    if not os.path.exists(args.chromium):
        raise UserError(f"no Chromium at {args.chromium} (install Debian's chromium, or pass --chromium)")
    plan, fixed = configurations(args.sessions, args.runs, args.tokens)
    for specs in plan:  # every bad input before anything starts
        for spec in specs:
            from .experiment import validate
            validate(spec)
    work = pathlib.Path(tempfile.mkdtemp(prefix="sparsity-loadtest-"))
    env = {**os.environ, "SPARSITY_APP_CACHE_DIR": str(work / "cache"), "SPARSITY_APP_LOCK_DIR": str(work / "slot")}
    os.environ.update({k: env[k] for k in ("SPARSITY_APP_CACHE_DIR", "SPARSITY_APP_LOCK_DIR")})  # the checks read them
    port = args.port or _free_port()
    _say(f"private directory {work}; app on http://127.0.0.1:{port}; {args.sessions} sessions x {args.runs} runs, "
         f"{args.tokens} tokens")
    server = _start(port, env, work / "server.log")
    t0 = time.monotonic()
    try:
        _wait_healthy(port, server)
        _say(f"server up in {time.monotonic() - t0:.1f} s")
        t1, cpu0 = time.monotonic(), _cpu(server.pid)
        try:
            outcomes, browser_cpu = asyncio.run(asyncio.wait_for(
                _drive(f"http://127.0.0.1:{port}", plan, fixed, args.chromium, args.timeout), args.timeout + 60))
        except TimeoutError:  # every run has its own deadline; this is the browser itself hanging
            print(f"FAILED the sessions did not finish within {args.timeout + 60:.0f} s")
            return 1
        load_s, cpu1 = time.monotonic() - t1, _cpu(server.pid)
        _say(f"CPU seconds during the load ({load_s:.0f} s wall, {os.cpu_count()} cores): streamlit server "
             f"{cpu1['server'] - cpu0['server']:.0f}, Chromium {browser_cpu:.0f}, whole machine "
             f"{cpu1['machine'] - cpu0['machine']:.0f} (other users included)")
    finally:
        _stop(server)
        _say("server stopped")
    try:
        return _report(plan, fixed, outcomes, load_s, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _say(f"kept {work}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, env: dict, log_path: pathlib.Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                                 "--server.address", "127.0.0.1", "--server.port", str(port),
                                 "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _wait_healthy(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"streamlit exited with status {server.returncode} before serving (see its log)")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    """The server and everything it started (its own session), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


async def _drive(url: str, plan: list[list[Spec]], fixed: Spec, chromium: str,
                 timeout: float) -> tuple[list[list[dict]], float]:
    """(each session's runs in order: {spec, ok, speedup, seconds, error}; CPU seconds the browser used)."""
    from playwright.async_api import async_playwright

    from .links import spec_to_query

    deadline = time.monotonic() + timeout

    async def session(browser, i: int, specs: list[Spec]) -> list[dict]:
        context = await browser.new_context(viewport={"width": 1400, "height": 1600}, reduced_motion="reduce")
        page, out = await context.new_page(), []
        try:
            for j, spec in enumerate(specs):
                start = time.monotonic()
                row = {"session": i, "run": j, "spec": spec, "ok": False, "speedup": None, "error": None}
                try:
                    left_ms = max(1000.0, (deadline - time.monotonic()) * 1000)
                    await page.goto(f"{url}/?{urllib.parse.urlencode(spec_to_query(spec))}", timeout=left_ms)
                    run = page.get_by_role("button", name="Run", exact=True)
                    await run.wait_for(timeout=min(left_ms, 120_000))
                    if spec == fixed:  # measured afresh by every session, not served from the cache
                        await page.get_by_text("Measure again and re-tune").click()
                    await run.click()
                    metric = page.get_by_text("Speedup vs best dense")
                    error = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
                    await metric.or_(error).first.wait_for(timeout=max(1000.0, (deadline - time.monotonic()) * 1000))
                    if await error.count():
                        row["error"] = (await error.first.inner_text()).strip().splitlines()[0][:200]
                    else:
                        value = await page.locator('[data-testid="stMetricValue"]').first.inner_text()
                        row["ok"], row["speedup"] = True, float(value.rstrip("x"))
                except Exception as e:  # a timeout or a browser failure: this run failed, say how
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                row["seconds"] = time.monotonic() - start
                _say(f"  session {i} run {j + 1}/{len(specs)}: {spec.layer} {spec.label()} @ {spec.sparsity:g}: "
                     + (f"{row['speedup']:.2f}x in {row['seconds']:.0f} s" if row["ok"] else f"FAILED ({row['error']})"))
                out.append(row)
                if time.monotonic() > deadline:
                    break
        finally:
            await context.close()
        return out

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            outcomes = list(await asyncio.gather(*(session(browser, i, specs) for i, specs in enumerate(plan))))
            return outcomes, _cpu(None, descendants_of=os.getpid())["tree"]
        finally:
            await browser.close()


def _cpu(server: int | None, descendants_of: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) so far: of process `server`, of every descendant of `descendants_of`
    (the Playwright driver and its Chromium), and of the whole machine (/proc/stat)."""
    tick, stats = os.sysconf("SC_CLK_TCK"), {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, cpu
    tree, frontier = set(), {descendants_of}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - tree
        tree |= frontier
    machine = sum(int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:4]) / tick
    return {"server": stats.get(server, (0, 0.0))[1], "tree": sum(stats[p][1] for p in tree), "machine": machine}


def _report(plan: list[list[Spec]], fixed: Spec, outcomes: list[list[dict]], load_s: float, args) -> int:
    from . import locks
    from .experiment import run, validate
    from .store import Store, key_of
    from .timing import fingerprint

    rows = [r for session in outcomes for r in session]
    wanted = sum(len(s) for s in plan)
    distinct = {s for specs in plan for s in specs}
    store = Store()
    stored = sum(store.get(key_of(validate(s)[0], fingerprint())) is not None for s in distinct)
    finished = sum(r["ok"] for r in rows)
    errored = [r for r in rows if r["error"]]
    holds = sorted(locks.holds(), key=lambda h: h["start"])
    overlaps = [(a, b) for a, b in zip(holds, holds[1:]) if b["start"] < a["end"]]
    seconds = sorted(r["seconds"] for r in rows)
    busy = sum(h["end"] - h["start"] for h in holds)

    loaded = [r["speedup"] for r in rows if r["spec"] == fixed and r["ok"]]
    quiet = []
    if loaded:
        _say(f"quiet: measuring {fixed.layer} {fixed.label()} @ {fixed.sparsity:g} {args.quiet_runs} times, re-tuned "
             "each time, nothing else running")
        quiet = [run(fixed, store=store, retune=True).speedup_vs_best_dense for _ in range(args.quiet_runs)]
    store.close()

    checks = []
    checks.append((f"runs finished with a result on the page: {finished}/{wanted}; configurations in the cache: "
                   f"{stored}/{len(distinct)}", finished == wanted and stored == len(distinct)))
    checks.append((f"runs that showed an error or timed out: {len(errored)}"
                   + "".join(f"\n    session {r['session']} run {r['run'] + 1}: {r['error']}" for r in errored[:10]),
                   not errored))
    checks.append((f"measurement holds in the slot's log: {len(holds)}, overlapping pairs: {len(overlaps)}",
                   not overlaps and len(holds) >= wanted))
    if not loaded or not quiet:
        checks.append(("fixed configuration: not measured under load" if not loaded else "no quiet runs", False))
    else:
        under, q = statistics.median(loaded), statistics.median(quiet)
        gap = abs(under - q) / q
        checks.append((f"fixed configuration ({fixed.layer}, {fixed.label()} @ {fixed.sparsity:g}, {fixed.tokens} "
                       f"tokens, {fixed.repeat} samples per implementation, re-tuned each time): median speedup vs "
                       f"best dense under load {under:.2f}x (sessions: {', '.join(f'{v:.2f}' for v in loaded)}), "
                       f"quiet {q:.2f}x (runs: {', '.join(f'{v:.2f}' for v in quiet)}); gap {gap:.1%} "
                       f"(<= {args.tolerance:.0%})", gap <= args.tolerance))
    print(f"load: {len(outcomes)} sessions x {max(len(s) for s in plan)} runs in {load_s:.0f} s; wall seconds per run "
          f"(press Run -> result shown): median {statistics.median(seconds):.0f}, max {seconds[-1]:.0f}; "
          f"slot busy {busy:.0f} s of {load_s:.0f} s")
    for text, ok in checks:
        print(f"{'ok    ' if ok else 'FAILED'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["add_arguments", "configurations", "main"]
