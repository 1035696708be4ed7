"""python -m sparsity_app loadtest: many app sessions at once against a real `streamlit run app.py`.

Starts the app on 127.0.0.1 with a private cache and measurement-slot directory, connects `--sessions`
websocket clients that speak Streamlit's own protocol (what a browser tab sends: the link's query
string, then the widget states of a Run press; what it gets back: the page's elements) and has each
press Run on `--runs` uncached single-layer configurations of the Explore page, all sessions at once.
The server does all it does for real tabs; the clients render nothing, so the 2 cores are the
server's, as on a real host where the browsers run on the users' machines (a local headless
Chromium took ~30% of the machine's CPU in an earlier version of this command). Each session's second
run is one fixed configuration with "Measure again and re-tune" ticked (so every session measures it afresh), the
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

from streamlit.proto.Alert_pb2 import Alert
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.asyncio.client import connect

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.core.store import Store, key_of
from sparsity_app.measure import locks
from sparsity_app.measure.timing import fingerprint
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import run
from sparsity_app.serve.links import spec_to_query

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXED_LAYER = "encoder.layer.0.attention.self.query"
SQUARE_ROLES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


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
    if args.quiet_runs is None:
        args.quiet_runs = args.sessions
    if not 1 <= args.quiet_runs <= 32:
        raise UserError("--quiet-runs must be in [1, 32]")
    plan, fixed = configurations(args.sessions, args.runs, args.tokens)
    for specs in plan:  # every bad input before anything starts
        for spec in specs:
            resolve.layer(spec)
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
        t1, cpu0, mine0 = time.monotonic(), _cpu(server.pid), time.process_time()
        try:
            outcomes = asyncio.run(asyncio.wait_for(_drive(f"http://127.0.0.1:{port}", plan, fixed, args.timeout),
                                                    args.timeout + 60))
        except TimeoutError:  # every run has its own deadline; this is a client itself hanging
            print(f"FAILED the sessions did not finish within {args.timeout + 60:.0f} s")
            return 1
        load_s, cpu1 = time.monotonic() - t1, _cpu(server.pid)
        _say(f"CPU seconds during the load ({load_s:.0f} s wall, {os.cpu_count()} cores): streamlit server "
             f"{cpu1['server'] - cpu0['server']:.0f}, the {args.sessions} clients {time.process_time() - mine0:.0f}, "
             f"whole machine {cpu1['machine'] - cpu0['machine']:.0f} (other users included)")
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


class _Session:
    """One app session spoken to as the browser speaks to it: a websocket to /_stcore/stream, BackMsg
    `rerun_script` (query string + widget states) in, ForwardMsg deltas out. No browser, no rendering:
    the server does everything it does for a real tab, the client costs next to nothing."""

    def __init__(self, url: str):
        self.url, self.ws, self.query, self.elements = url, None, "", []

    async def open(self, query: str, timeout: float) -> None:
        """Connect and run the page at `?query`, as a tab opening the link does."""
        origin = self.url.rstrip("/")
        self.ws = await connect(origin.replace("http", "ws", 1) + "/_stcore/stream", subprotocols=["streamlit"],
                                origin=origin, max_size=None, open_timeout=timeout)
        self.query = query
        await self.rerun([], timeout)

    async def rerun(self, widgets: list, timeout: float) -> None:
        """Rerun the script with these WidgetStates (a button press is a trigger_value) and read until it ends;
        self.elements is then the elements that run produced, in order."""
        msg = BackMsg()
        msg.rerun_script.query_string = self.query
        msg.rerun_script.widget_states.widgets.extend(widgets)
        await self.ws.send(msg.SerializeToString())
        self.elements = []
        await asyncio.wait_for(self._until_finished(), timeout)

    async def _until_finished(self) -> None:
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(await self.ws.recv())
            kind = msg.WhichOneof("type")
            if kind == "new_session":
                self.elements = []
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                self.elements.append(msg.delta.new_element)
            elif kind == "script_finished" and msg.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                return

    def find(self, kind: str, label_start: str):
        """The first element of this kind whose label starts with `label_start`, or None."""
        return next((getattr(e, kind) for e in self.elements if e.WhichOneof("type") == kind
                     and getattr(e, kind).label.startswith(label_start)), None)

    def error(self) -> str | None:
        """The first error the page showed (an st.error or an exception), one line, or None."""
        for e in self.elements:
            if e.WhichOneof("type") == "alert" and e.alert.format == Alert.ERROR:
                return e.alert.body.strip().splitlines()[0][:200]
            if e.WhichOneof("type") == "exception":
                return f"{e.exception.type}: {e.exception.message.splitlines()[0][:200]}"
        return None

    def headings(self) -> list[str]:
        return [e.heading.body for e in self.elements if e.WhichOneof("type") == "heading"]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def _drive(url: str, plan: list[list[Spec]], fixed: Spec, timeout: float) -> list[list[dict]]:
    """Each session's runs in order: {session, run, spec, ok, speedup, seconds, error}. A run opens the
    configuration's link, ticks "Measure again and re-tune" for the fixed configuration (so every session
    measures it afresh), presses Run and reads the page it gets back: the speedup metric, or its error."""
    deadline = time.monotonic() + timeout

    async def one_run(client: _Session, spec: Spec, row: dict) -> None:
        left = lambda: max(1.0, deadline - time.monotonic())
        await client.open(urllib.parse.urlencode(spec_to_query(spec)), left())
        run = client.find("button", "Run")
        if run is None:
            raise RuntimeError(client.error() or "no Run button on the page")
        widgets = [WidgetState(id=run.id, trigger_value=True)]
        if spec == fixed:
            widgets.append(WidgetState(id=client.find("checkbox", "Measure again").id, bool_value=True))
        await client.rerun(widgets, left())
        if error := client.error():
            row["error"] = error
            return
        metric = client.find("metric", "Speedup vs best dense")
        wanted = f"{spec.label()} at sparsity"
        shown = [h for h in client.headings() if h.startswith(wanted) and spec.layer in h]
        if metric is None or not shown:
            raise RuntimeError(f"no result for {spec.label()} on {spec.layer} on the page")
        row["ok"], row["speedup"] = True, float(metric.body.rstrip("x"))

    async def session(i: int, specs: list[Spec]) -> list[dict]:
        out = []
        for j, spec in enumerate(specs):
            start = time.monotonic()
            row = {"session": i, "run": j, "spec": spec, "ok": False, "speedup": None, "error": None}
            client = _Session(url)  # a fresh tab per run, as a user opening each link
            try:
                await one_run(client, spec, row)
            except Exception as e:  # a timeout or a dropped connection: this run failed, say how
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            finally:
                await client.close()
            row["seconds"] = time.monotonic() - start
            _say(f"  session {i} run {j + 1}/{len(specs)}: {spec.layer} {spec.label()} @ {spec.sparsity:g}: "
                 + (f"{row['speedup']:.2f}x in {row['seconds']:.0f} s" if row["ok"] else f"FAILED ({row['error']})"))
            out.append(row)
            if time.monotonic() > deadline:
                break
        return out

    return list(await asyncio.gather(*(session(i, specs) for i, specs in enumerate(plan))))


def _cpu(server: int) -> dict[str, float]:
    """CPU seconds (user + system) so far: of process `server` and of the whole machine (/proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = pathlib.Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        mine = (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        mine = 0.0
    machine = sum(int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:4]) / tick
    return {"server": mine, "machine": machine}


def _report(plan: list[list[Spec]], fixed: Spec, outcomes: list[list[dict]], load_s: float, args) -> int:
    rows = [r for session in outcomes for r in session]
    wanted = sum(len(s) for s in plan)
    distinct = {s for specs in plan for s in specs}
    store = Store()
    stored = sum(store.get(key_of(resolve.layer(s).spec, fingerprint())) is not None for s in distinct)
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


__all__ = ["configurations", "main"]
