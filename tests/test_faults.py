"""Faults: a compile failure, a process killed mid-sweep, a corrupt cache, a full disk. Each gives one
clear message, loses no finished point, leaves the cache readable, and the app and the CLI go on."""
import dataclasses
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import diskcache
import pytest
from streamlit.testing.v1 import AppTest
from test_figures import _result

from sparsity_app import Spec, run
from sparsity_app.cli.main import main
from sparsity_app.core.errors import CompileError
from sparsity_app.core.store import CacheWriteError, Store, _TextDisk
from sparsity_app.kernels import bsr, families
from sparsity_app.measure import locks

APP = str(pathlib.Path(__file__).resolve().parent.parent / "app.py")
CHEAP = ["--model", "bert-base-synthetic", "--tokens", "8", "--repeat", "3"]
TVM_ERROR = ("InternalError: Check failed: (lowered.defined()) is false: cannot lower the block loop\n"
             "Stack trace:\n  0: tvm::tir::transform::LowerIntrin\n  1: tvm::transform::Pass::operator()")


def _fails_on_4x4(weight, tokens, knobs, n_parts=None):
    """The real BSR packing, except that building a 4x4-block kernel fails as TVM fails (a long message)."""
    if weight.block == (4, 4):
        raise RuntimeError(TVM_ERROR)
    return bsr.pack(weight, tokens, knobs, n_parts)


def _break_4x4(monkeypatch) -> None:
    monkeypatch.setitem(families.FAMILIES, "bsr", dataclasses.replace(families.FAMILIES["bsr"], pack=_fails_on_4x4))


def _app(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    return at.switch_page(page).run()


# A process killed mid-sweep ----------------------------------------------------------------------------

def test_kill_9_mid_sweep_keeps_exactly_the_finished_points_and_the_next_sweep_resumes(cache_dir):
    sweep = [sys.executable, "-m", "sparsity_app", "sweep", *CHEAP, "--blocks", "32x1",
             "--sparsities", "0.86,0.88,0.9,0.92"]  # one tuning bucket: only the first point tunes
    env = {**os.environ, "SPARSITY_APP_CACHE_DIR": str(cache_dir)}
    watcher = Store(cache_dir)
    victim = subprocess.Popen(sweep, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(watcher) < 1:  # the moment the first point is stored
            assert victim.poll() is None and time.monotonic() < deadline, "the sweep ended before it was killed"
            time.sleep(0.02)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    after = Store(cache_dir)  # a fresh reader, as the next process would open it
    finished = sorted(r.spec.sparsity for r in after.results())
    k = len(finished)
    assert 1 <= k < 4, f"the kill came too late: {k} points stored"
    assert len(after) == k  # exactly the finished points: no torn or half-written entry
    assert finished == [0.86, 0.88, 0.9, 0.92][:k]  # the first k of the grid, in order

    again = subprocess.Popen(sweep, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"resuming: {k} of 4 points already stored (cached); measuring the other {4 - k}" in err
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("block 32x1")]
    assert [row[-1] for row in rows] == ["True"] * k + ["False"] * (4 - k)  # the cached column
    assert sum(h["pid"] == again.pid for h in locks.holds()) == 4 - k  # it measured only the rest
    assert len(Store(cache_dir)) == 4


# A compile failure --------------------------------------------------------------------------------------

def test_compile_failure_is_one_line_stores_nothing_and_frees_the_slot(monkeypatch, cache_dir, capsys):
    _break_4x4(monkeypatch)
    with pytest.raises(CompileError, match=r"TVM could not compile the kernel with schedule .*: InternalError"):
        run(Spec(model="bert-base-synthetic", block=(4, 4), sparsity=0.9, tokens=8, repeat=3), store=Store())
    assert main(["run", *CHEAP, "--block", "4x4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("internal error: CompileError: TVM could not compile") and "Stack trace" not in err
    assert len(Store()) == 0 and Store().tunings() == 0 and locks.queue_length() == 0


def test_sweep_page_shows_a_compile_failure_and_keeps_the_other_points(monkeypatch, cache_dir):
    _break_4x4(monkeypatch)
    at = _app("app_pages/sweep.py")
    at.selectbox(key="sweep_model").set_value("bert-base-synthetic").run()
    at.number_input(key="sweep_tokens").set_value(8)
    at.multiselect(key="sweep_blocks").set_value(["4x4", "32x1"])
    at.multiselect(key="sweep_sparsities").set_value([0.9])
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "4x4" in errors[0] and "CompileError" in errors[0] and "Stack trace" not in errors[0]
    assert any("1 of 2 points measured" in c.value for c in at.caption)  # the page goes on with the point it has
    assert len(Store()) == 1


# A corrupt cache -------------------------------------------------------------------------------------------

def test_a_garbage_value_is_dropped_and_the_rest_stays_readable(cache_dir):
    store = Store()
    store.put("good", _result(0.8, 2.0))
    store.put("bad", _result(0.9, 3.0))
    store._cache.set("bad", "{this is not json")  # as a torn or foreign write would leave it
    assert store.get("bad") is None
    assert [r.spec.sparsity for r in store.results()] == [0.8] and len(store) == 1  # dropped, not kept failing


def test_nothing_in_the_cache_is_ever_unpickled(cache_dir, tmp_path):
    flag = tmp_path / "unpickled"

    class Payload:  # what a tampered cache directory could hold: unpickling it runs code
        def __reduce__(self):
            return (pathlib.Path.touch, (flag,))

    store = Store()
    store.put("good", _result(0.8, 2.0))
    foreign = diskcache.Cache(str(cache_dir))  # the default Disk pickles
    foreign.set("evil", Payload())
    foreign.set(("a", "pickled", "key"), "text")
    foreign.close()
    store = Store()
    assert store.get("evil") is None
    assert [r.spec.sparsity for r in store.results()] == [0.8]
    assert not flag.exists()
    with pytest.raises(TypeError):  # and nothing but text is ever written
        store._cache.set("k", Payload())


def test_a_garbage_index_is_kept_aside_with_a_note_and_the_app_and_cli_go_on(cache_dir, capsys):
    store = Store()
    store.put("good", _result(0.8, 2.0))
    store.put_tuning("schedule", {"winner": {}})
    store.close()
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        (cache_dir / name).unlink(missing_ok=True)
    (cache_dir / "cache.db").write_bytes(os.urandom(64 * 1024))

    assert main(["cache", "info"]) == 0
    captured = capsys.readouterr()
    assert "was unreadable" in captured.err and "kept aside as cache.db.corrupt-" in captured.err
    assert "0 results, 1 tuned schedules" in captured.out  # the other namespaces are untouched
    assert list(cache_dir.glob("cache.db.corrupt-*"))

    (cache_dir / "cache.db").write_bytes(b"garbage again" * 1000)
    at = _app("app_pages/learn.py")
    assert not at.exception
    assert any("was unreadable" in w.value for w in at.sidebar.warning)
    assert at.title


# A full disk ------------------------------------------------------------------------------------------------

def _disk_full(monkeypatch):
    def refuse(self, value, read, key=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(_TextDisk, "store", refuse)


def test_a_full_sqlite_index_is_a_clear_message_and_stored_results_stay_readable(cache_dir):
    store = Store()
    store.put("kept", _result(0.8, 2.0))
    pages = store._cache._sql("PRAGMA page_count").fetchone()[0]
    store._cache.reset("sqlite_max_page_count", pages)  # sqlite itself reports SQLITE_FULL from now on
    with pytest.raises(CacheWriteError, match=r"could not store the result in .*: the disk is full \(database or disk "
                                              r"is full\); results stored before are kept"):
        for i in range(50):
            store.put(f"new{i}", _result(0.9, 3.0))
    assert store.get("kept").spec.sparsity == 0.8  # a least-recently-used read still works


def test_a_full_disk_stops_the_run_with_one_line_and_the_cli_and_app_go_on(monkeypatch, cache_dir, capsys):
    store = Store()
    store.put("kept", _result(0.8, 2.0))
    _disk_full(monkeypatch)
    assert main(["run", *CHEAP, "--sparsity", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not store the tuned schedule") and "the disk is full" in err[-1]
    assert main(["cache", "info"]) == 0 and "1 results" in capsys.readouterr().out

    at = _app("app_pages/explore.py")
    at.selectbox(key="model").set_value("bert-base-synthetic").run()
    at.number_input(key="tokens").set_value(8)
    at.button(key="FormSubmitter:explore-Run").click().run()
    assert not at.exception
    assert any("disk is full" in e.value for e in at.error)
    assert Store().get("kept") is not None and locks.queue_length() == 0
