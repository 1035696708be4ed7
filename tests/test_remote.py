"""Remote measurement through TVM's own RPC tracker and servers, all on 127.0.0.1.

The fixture starts a tracker and two servers as subprocesses, each in its own process group (their
popen workers survive a plain SIGTERM), and kills those groups by id when the test ends, pass or fail.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.measure.backend import Backend
from sparsity_app.runs import resolve

KEY = "loopback-cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def _die_with_parent() -> None:
    """In the child: SIGKILL it if pytest itself is killed (then no finalizer runs)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Cluster:
    def __init__(self, tmp_path):
        self.tmp_path, self.procs, self.servers = tmp_path, [], []

    def start(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp_path / f"rpc-{len(self.procs)}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        self.procs.append(p)
        return p

    def add_server(self, key: str) -> subprocess.Popen:
        """A server of `key` registered with this cluster's tracker (free ports)."""
        sp = _free_port()
        return self.start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sp), "--port-end", str(sp + 1),
                          "--tracker", self.backend.tracker, "--key", key, env={"TVM_NUM_THREADS": "2"})

    def kill(self, p: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the server and its forked session and popen workers
        p.wait(timeout=10)

    def stop(self) -> None:
        for p in reversed(self.procs):
            self.kill(p)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tracker and two servers of KEY on 127.0.0.1 (free ports), stopped by their group ids at the
    end of the module (one start for its tests: each server imports TVM, seconds on a busy machine)."""
    from sparsity_app.measure import remote

    c = Cluster(tmp_path_factory.mktemp("rpc"))
    try:
        port = _free_port()
        c.start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
        c.backend = Backend(kind="rpc", tracker=f"127.0.0.1:{port}", key=KEY)
        for _ in range(2):  # started with the tracker: importing TVM takes longer than the tracker's bind
            c.servers.append(c.add_server(KEY))
        _wait(lambda: _accepts(port), "the tracker")
        _wait(lambda: remote.servers(c.backend)[1] == 2, "two free servers")
        yield c
    finally:
        c.stop()
        remote.probe.cache_clear()


def _grid() -> list[Spec]:
    # One bucket of sparsities, so the first point's tuning (on the device) serves the others.
    return [Spec(model="bert-base-synthetic", layer="encoder.layer.0.attention.self.query", method="block",
                 block=(32, 1), sparsity=s, tokens=16, repeat=3, threads=2) for s in (0.88, 0.9, 0.92)]


def test_sweep_fans_out_survives_a_lost_server_and_caches_remote_results(cluster, tmp_path):
    from sparsity_app.core.store import Store, key_of
    from sparsity_app.measure import locks, remote
    from sparsity_app.measure.tuner import check_output, families
    from sparsity_app.model.catalog import get_model
    from sparsity_app.model.pruned import mask_of
    from sparsity_app.measure.tuner import sparse_format
    from sparsity_app.runs.layer import lookup
    from sparsity_app.runs.sweep import sweep as run_sweep

    store, grid, killed = Store(tmp_path / "cache"), _grid(), []

    def on_event(event):
        if event.kind == "measured" and not killed:  # the other worker holds its server, mid-point or about to start
            killed.append(cluster.servers[0])
            cluster.kill(cluster.servers[0])

    report = run_sweep(grid, cluster.backend, store, on_event=on_event)
    assert report.workers == 2
    assert not report.failures, report.failures
    assert sorted(report.results) == [0, 1, 2]  # no point lost
    assert report.retried, "the killed server's point was not retried"

    info = remote.probe(cluster.backend)
    assert info.mcpu and info.threads == 2 and info.on_this_machine
    # Servers on this machine time on our cores: each point held the machine's slot, never two at once.
    holds = sorted((h for h in locks.holds() if f"on {info.label}" in h["who"]), key=lambda h: h["start"])
    assert len(holds) >= len(grid)
    assert all(a["end"] <= b["start"] for a, b in zip(holds, holds[1:]))
    for spec in grid:
        r = store.get(key_of(resolve.spec(spec, info.cores), info.fingerprint))
        assert r is not None  # cached under the remote device's fingerprint
        assert r.machine["device"] == info.label and r.machine["key"] == KEY
        assert set(r.times_ms) == {"tvm_sparse", "tvm_dense"}  # PyTorch cannot run there
        assert r.speedup_vs_torch_dense is None and r.speedup_vs_best_dense > 0
        assert r.backend["measured_on"] == {"tvm_sparse": info.label, "tvm_dense": info.label}
        assert set(r.backend["not_measured"]) == {"torch_dense", "torch_dense_fm"}
        assert max(r.backend["max_rel_error"].values()) < 1e-4
        assert lookup(spec, store) is None  # never mixed with this machine's results
        assert lookup(spec, store, cluster.backend) == r

    # Independently: each stored schedule, run on the surviving server, matches the dense reference.
    with remote.open_device(cluster.backend) as device:
        device.set_threads(2)
        for spec in grid:
            r = lookup(spec, store, cluster.backend)
            weight, _ = get_model(spec.model).weight(spec.layer)
            mask = mask_of(resolve.spec(spec))
            x = get_model(spec.model).calibration(spec.layer, spec.tokens)
            family, sparse = sparse_format(weight, mask, r.spec)
            kernel = families()[family].kernel(sparse, x, families()[family].knobs(**r.kernel["knobs"]),
                                               n_parts=device.n_parts)
            got = device.prepare({"k": kernel}).output("k")
            check_output(spec.label(), got, x.astype(np.float64) @ (weight * mask).astype(np.float64).T)


def test_bad_backend_is_one_clear_line(cluster):
    from sparsity_app.runs.layer import run

    with pytest.raises(UserError, match="HOST:PORT"):
        Backend(kind="rpc", tracker="nowhere", key=KEY).resolve()
    with pytest.raises(UserError, match="no server with key 'absent'"):
        run(_grid()[0], backend=Backend(kind="rpc", tracker=cluster.backend.tracker, key="absent"))
    with pytest.raises(UserError, match="--rpc-target"):
        Backend(kind="rpc", tracker=cluster.backend.tracker, key=KEY, target="cpu=arm").resolve()


def test_sweep_ends_when_every_server_of_its_key_dies(cluster):
    """A worker that lost its server asks the tracker for another while the last one is busy; then
    that one dies too. TVM's tracker keeps such a request queued for ever: the sweep must end anyway,
    every unmeasured point failed with one clear line."""
    import threading

    from sparsity_app.measure import remote
    from sparsity_app.runs.sweep import sweep as run_sweep

    key = "loopback-doomed"  # its own key: the module's surviving server must not rescue the sweep
    backend = Backend(kind="rpc", tracker=cluster.backend.tracker, key=key)
    doomed = [cluster.add_server(key) for _ in range(2)]
    _wait(lambda: remote.servers(backend)[1] == 2, "two free servers of the doomed key")
    grid = [dataclasses.replace(_grid()[0], sparsity=s) for s in (0.86, 0.87, 0.88, 0.89, 0.9, 0.91)]

    timers: list[threading.Timer] = []
    lock = threading.Lock()  # events come from both workers' threads

    def kill_one(index: int) -> None:
        with lock:
            if doomed:
                cluster.kill(doomed.pop(index))

    def on_event(event):
        if event.kind == "measured" and len(doomed) == 2:  # one server dies between its worker's points
            kill_one(0)
        elif event.kind == "retried" and not timers:  # its worker is about to wait for the busy one: kill that too
            timers.append(threading.Timer(3.0, kill_one, args=(-1,)))
            timers[0].start()

    finished = []
    sweep = threading.Thread(target=lambda: finished.append(run_sweep(grid, backend, on_event=on_event)), daemon=True)
    sweep.start()
    sweep.join(timeout=180)
    for t in timers:
        t.join()
    assert finished, "the sweep still waits for a server that no longer exists"
    report = finished[0]
    assert not doomed and report.workers == 2 and report.retried
    assert report.failures and len(report.results) + len(report.failures) == len(grid)
    assert all("no server with key 'loopback-doomed'" in e or "lost 3 servers" in e for e in report.failures.values()), \
        report.failures


def _stored(sparsity: float, device: str | None, code: str, threads: int = 2):
    """A stored-looking result; device None = this machine, else a remote one without PyTorch peers."""
    from sparsity_app.core.results import Result, Timing

    def t(ms):
        return Timing(median=ms, spread=0.0, min=ms, max=ms, runs=3)

    spec = resolve.spec(Spec(block=(32, 1), sparsity=sparsity, threads=threads), threads)
    times = {"tvm_sparse": t(0.5), "tvm_dense": t(1.0)}
    if device is None:
        times.update(torch_dense=t(1.2), torch_dense_fm=t(1.1))
    where = {} if device is None else {"kind": "rpc", "device": device, "measured_on": {n: device for n in times}}
    return Result(spec=spec, shape=(384, 384), sparsity_achieved=sparsity, stored_blocks=1, sparse_bytes=1,
                  dense_bytes=1, times_ms=times, tune_s=0.0, compile_s=0.1, proxies={}, machine={
                      "cpu": "cpu", "isa": [], "cores": threads, "code": code}, backend=where)


def test_devices_side_by_side_only_for_the_grid_and_this_code():
    from sparsity_app.core.results import Result
    from sparsity_app.serve import analysis, charts

    grid = [resolve.spec(Spec(block=(32, 1), sparsity=s)) for s in (0.8, 0.9)]
    results = [_stored(0.8, None, "now"), _stored(0.9, None, "now"), _stored(0.8, "RPC key arm (cortex-a72)", "now", 4),
               _stored(0.9, "RPC key arm (cortex-a72)", "old", 4),  # another code version: left out
               _stored(0.7, "RPC key arm (cortex-a72)", "now", 4)]  # not in the grid: left out
    df = analysis.device_frame(results, grid, code="now")
    assert sorted(zip(df["device"], df["sparsity_target"])) == [
        ("RPC key arm (cortex-a72)", 0.8), ("this machine", 0.8), ("this machine", 0.9)]
    spec = charts.devices(df).to_dict()
    assert spec["layer"][1]["encoding"]["color"]["field"] == "device"
    remote_row = df[df["device"] != "this machine"].iloc[0]
    assert np.isnan(remote_row["speedup_vs_torch_dense"]) and remote_row["speedup_vs_tvm_dense"] == 2.0
    again = Result.from_dict(results[2].to_dict())  # the backend survives the store's JSON
    assert again.device == "RPC key arm (cortex-a72)" and again.speedup_vs_torch_dense is None


@pytest.mark.parametrize("args, words", [
    (["--rpc-key", "k"], "both --rpc-tracker HOST:PORT and --rpc-key"),
    (["--rpc-target", "mcpu=znver4"], "--rpc-target needs --rpc-tracker"),
    (["--rpc-tracker", "localhost", "--rpc-key", "k"], "must look like HOST:PORT"),
    (["--rpc-tracker", "127.0.0.1:{closed}", "--rpc-key", "k"], "cannot reach the RPC tracker"),
])
def test_bad_rpc_flags_are_one_line_and_exit_2(args, words, capsys, cache_dir):
    from sparsity_app.cli.main import main

    args = [a.format(closed=_free_port()) for a in args]  # a port nothing listens on
    assert main(["run", "--model", "bert-base-synthetic", "--tokens", "8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err


def test_app_says_when_the_tracker_cannot_be_reached(cache_dir):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/sweep.py").run()
    at.radio(key="backend_kind").set_value("RPC tracker").run()
    at.text_input(key="backend_key").set_value("")
    at.run()
    assert not at.exception and any("device key" in e.value for e in at.error)  # a bad setting stops the page
    at.text_input(key="backend_key").set_value("board")
    at.text_input(key="backend_tracker").set_value(f"127.0.0.1:{_free_port()}").run()
    assert any("cannot reach the RPC tracker" in e.value for e in at.error)  # looking up the grid's stored points
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    assert not at.exception
    assert any("cannot reach the RPC tracker" in e.value for e in at.error)
