"""Three sweep workers share one study on a PostgreSQL server: a worker killed with kill -9, a
worker whose machine vanishes (stopped, so its heartbeat stops), and the database restarting
mid-sweep. After each, every grid point is exactly one finished trial.

The server is started here on 127.0.0.1 in a temporary directory (as the `postgres` user when
the tests run as root). Without PostgreSQL or a driver the tests skip with the reason, unless
LORANK_REQUIRE_POSTGRES=1 (scripts/test.sh sets it), where they fail instead. Workers are
processes forked from a server that has imported torch and lorank once (`sweep_worker`), each
running `lorank sweep` with its training steps paced.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sweep_worker
from conftest import write_jsonl
from optuna.trial import TrialState

from lorank.sweep import FINISHED

pytestmark = pytest.mark.postgres

RANKS = [1, 2, 4, 8]
POINTS = {(r, 3e-3, 0) for r in RANKS}
HEARTBEAT, GRACE = 1, 4  # seconds: short, so a dead worker's point runs again within the test
# each training step sleeps this long: faults land mid-run, and a run (4 steps) outlasts the
# grace period, so only beats sent while it trains keep its trial alive
STEP_SECONDS = 1.1

def _unavailable(reason: str):
    if os.environ.get("LORANK_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (LORANK_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(reason)


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway server: trust auth, loopback only, unix socket in its own directory."""

    def __init__(self, initdb: str, pg_ctl: str):
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="lorank-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root)
                _unavailable("running as root and there is no 'postgres' user to run the server")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(initdb, "-D", str(self.data), "-U", "lorank", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}{log}")

    def ctl(self, action: str, *extra: str) -> None:
        self._run(self.pg_ctl, action, "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", self.options, *extra)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://lorank@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="lorank",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.ctl("stop", "-m", "immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def forkserver():
    """Workers fork from one process that imported everything (`sweep_worker`). It imports
    from PYTHONPATH (this checkout's src and tests), which it takes from the environment when
    it starts: the first Process started (in `postgres`, while the database initializes)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sweep_worker"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([sweep_worker.SRC, str(Path(__file__).parent),
                                                *([saved] if saved else [])])
    try:
        ready = ctx.Process(target=os.getpid)
        ready.start()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield ctx, ready


@pytest.fixture(scope="module")
def postgres(forkserver):
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("no PostgreSQL driver (pip install 'psycopg[binary]')")
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    server = Postgres(initdb, pg_ctl)
    try:
        server.ctl("start")
    except RuntimeError as err:
        server.close()
        _unavailable(f"PostgreSQL would not start: {str(err)[-300:]}")
    forkserver[1].join()  # the fork server has imported everything
    yield server
    server.close()


class Sweep:
    """Three workers of one sweep: the command, their processes, and what the study holds."""

    def __init__(self, ctx, url: str, model: Path, data: Path, out: Path):
        self.ctx, self.url, self.out, self.log = ctx, url, out, out.parent / "steps.log"
        self.argv = ["sweep", "-m", str(model), "-d", str(data),
                    "--ranks", ",".join(map(str, RANKS)), "--lrs", "3e-3", "--seeds", "0",
                    "--steps", "4", "--eval-every", "2", "--batch-size", "4",
                    "--max-length", "32", "--storage", url, "--heartbeat", str(HEARTBEAT),
                    "--grace", str(GRACE), "--out", str(out), "--quiet"]
        self.env = {"STEP_LOG": str(self.log), "STEP_SECONDS": str(STEP_SECONDS),
                    "TOKENIZERS_PARALLELISM": "false"}
        self.procs: list[multiprocessing.Process] = []

    def start(self, n: int = 3) -> None:
        for _ in range(n):
            err = str(self.out.parent / f"worker{len(self.procs)}.err")
            proc = self.ctx.Process(target=sweep_worker.run, args=(self.argv, self.env, err))
            proc.start()
            self.procs.append(proc)

    def steps(self) -> list[tuple[int, str, int]]:
        """(pid, point, step) of every step trained so far, in order."""
        return [(p, name, s) for p, name, s, _ in self.timed_steps()]

    def timed_steps(self) -> list[tuple[int, str, int, float]]:
        if not self.log.exists():
            return []
        rows = [ln.split() for ln in self.log.read_text().splitlines()]
        return [(int(p), name, int(s), float(t)) for p, name, s, t in
                (r for r in rows if len(r) == 4)]

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="lorank-sweep", storage=self.url)

    def finished(self) -> Counter:
        return Counter((p["rank"], p["lr"], p["seed"]) for t in self.study().get_trials()
                       if t.user_attrs.get(FINISHED) for p in [t.system_attrs["fixed_params"]])

    def describe(self) -> str:
        trials = "\n".join(f"{t.number} {t.state.name} {t.system_attrs.get('fixed_params')} "
                           f"{ {k: v for k, v in t.user_attrs.items() if k != 'per_example'} }"
                           for t in self.study().get_trials())
        errs = "\n".join(f"worker{i}: {p.read_text()[-1500:]}" for i, p in
                         enumerate(sorted(self.out.parent.glob("worker*.err"))))
        return f"{trials}\n{errs}"

    def wait_for(self, what: str, condition, timeout: float = 150.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = condition()
            if found:
                return found
            if not any(p.is_alive() for p in self.procs):
                break
            time.sleep(0.1)
        raise AssertionError(f"{what}: not seen in time\n{self.describe()}")

    def mid_run(self) -> tuple[int, str] | None:
        """A worker past its first checkpoint (step 2) and not yet done: (pid, point)."""
        done = {(pid, name) for pid, name, s in self.steps() if s == 4}
        for pid, name, s in self.steps():
            if s == 3 and (pid, name) not in done:
                return pid, name
        return None

    def join(self, procs: list[multiprocessing.Process], timeout: float = 150.0) -> None:
        deadline = time.time() + timeout
        for p in procs:
            p.join(max(1.0, deadline - time.time()))
            if p.is_alive():
                raise AssertionError(f"worker {p.pid} did not finish\n{self.describe()}")
        bad = {p.pid: p.exitcode for p in procs if p.exitcode != 0}
        assert not bad, f"workers failed (pid: exit code) {bad}\n{self.describe()}"

    def assert_each_point_once(self) -> None:
        finished = self.finished()
        assert set(finished) == POINTS and set(finished.values()) == {1}, self.describe()
        assert not self.study().get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
        assert sorted(p.name for p in (self.out / "trials").glob("*.json")) == sorted(
            f"r{r}_lr0.003_s0.json" for r in RANKS)
        assert not any((self.out / "checkpoints").iterdir())  # removed once stored

    def interrupted(self) -> list[int]:
        """Trials failed because their worker was taken for dead (not claim losers: workers
        that enqueue a point at once queue it twice, and the second claim fails)."""
        return [t.number for t in self.study().get_trials(states=(TrialState.FAIL,))
                if str(t.user_attrs.get("status")).startswith("interrupted")]

    def trial_of(self, pid: int, point: str) -> optuna.trial.FrozenTrial:
        """The trial in which worker `pid` ran `point` (named as its checkpoint directory)."""
        def name(t) -> str:
            p = t.system_attrs.get("fixed_params") or {}
            return f"r{p.get('rank')}_lr{p.get('lr', 0):g}_s{p.get('seed')}"

        return next(t for t in self.study().get_trials()
                    if t.user_attrs.get("pid") == pid and name(t) == point)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.join()


@pytest.fixture
def sweep(forkserver, postgres, tiny_llama_dir, tmp_path, request):
    rows = [{"prompt": f"n{i}:", "completion": f" {i % 7}{i % 5}"} for i in range(48)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    url = postgres.create_database(request.node.name.replace("[", "_").strip("]"))
    job = Sweep(forkserver[0], url, tiny_llama_dir, data, tmp_path / "sweep")
    t0 = time.time()
    yield job
    job.kill_all()
    timed = job.timed_steps()
    first = f"{timed[0][3] - t0:.1f}" if timed else "-"
    last = f"{timed[-1][3] - t0:.1f}" if timed else "-"
    try:
        statuses = Counter(f"{t.state.name}:{t.user_attrs.get('status')}"
                           for t in job.study().get_trials())
    except Exception as err:  # the summary is for the log only
        statuses = Counter({repr(err)[:80]: 1})
    print(f"\n{request.node.name}: {time.time() - t0:.1f} s (first step at {first} s, last "
          f"at {last} s; {len(job.procs)} workers; trials {dict(statuses)})")


def test_kill_9_mid_run(sweep):
    """A worker killed after its first checkpoint: its trial goes stale, a survivor fails it
    and resumes the point from that checkpoint (steps 3-4 only)."""
    sweep.start()
    pid, point = sweep.wait_for("a worker mid-run", sweep.mid_run)
    os.kill(pid, signal.SIGKILL)
    victim = next(p for p in sweep.procs if p.pid == pid)
    victim.join()
    sweep.join([p for p in sweep.procs if p is not victim])
    sweep.assert_each_point_once()
    dead = sweep.trial_of(pid, point)
    assert dead.state == TrialState.FAIL and dead.user_attrs["status"] == "interrupted"
    assert sweep.interrupted() == [dead.number]  # the live ones kept beating
    resumed = [s for p, name, s in sweep.steps() if name == point and p != pid]
    assert resumed == [3, 4], sweep.steps()  # from the step-2 checkpoint, not from step 1


def test_worker_whose_machine_vanishes(sweep):
    """A worker stopped mid-run (as if its machine went away: no heartbeat, no exit) whose
    trial says it ran on another host: the others run its point. When it comes back it finds
    its trial settled, stores nothing and exits."""
    sweep.start()
    pid, point = sweep.wait_for("a worker mid-run", sweep.mid_run)
    os.kill(pid, signal.SIGSTOP)
    held = sweep.trial_of(pid, point)
    storage = sweep.study()._storage
    storage.set_trial_user_attr(held._trial_id, "host", "elsewhere")  # its pid exists here
    victim = next(p for p in sweep.procs if p.pid == pid)
    others = [p for p in sweep.procs if p is not victim]
    sweep.join(others)
    assert victim.is_alive()  # still there, stopped: only its heartbeat said it was gone
    sweep.assert_each_point_once()
    assert sweep.interrupted() == [held.number]
    assert [s for p, name, s in sweep.steps() if name == point and p != pid] == [3, 4]
    os.kill(pid, signal.SIGCONT)  # it comes back after the sweep finished without it
    sweep.join([victim])
    sweep.assert_each_point_once()


def test_database_restarts_mid_sweep(sweep, postgres):
    """The database goes down while three workers train and comes back after longer than the
    grace period: they wait for it, keep their runs (none is taken for dead over the beats the
    outage swallowed) and finish the sweep with no worker restarted."""
    sweep.start()
    workers = sweep.out / "workers"
    sweep.wait_for("three workers registered and one mid-run", lambda: (
        workers.is_dir() and len(list(workers.iterdir())) == 3 and sweep.mid_run()))
    assert len(sweep.finished()) < len(POINTS), "the restart must land mid-sweep"
    postgres.ctl("stop", "-m", "fast")
    time.sleep(GRACE + 1)
    postgres.ctl("start")
    restarted = time.time()
    sweep.join(sweep.procs)
    sweep.assert_each_point_once()
    assert any(t > restarted for *_, t in sweep.timed_steps())  # training went on after it
    stale = [t.number for t in sweep.study().get_trials(states=(TrialState.FAIL,))
             if t.user_attrs.get("status") == "interrupted"]
    assert not stale, sweep.describe()


def test_heartbeats_missed_during_an_outage_fail_nothing(postgres, tmp_path, monkeypatch):
    """A trial silent past the grace period is stale, but a worker that has just seen the
    database fail judges no heartbeat (the beats were lost to the outage, not to a death)."""
    from lorank import sweep as sweep_mod

    url = postgres.create_database("outage")
    study = sweep_mod.open_study(tmp_path, url, prune=False, heartbeat=1, grace=2)
    study.enqueue_trial({"rank": 1, "lr": 3e-3, "seed": 0})
    spec = sweep_mod.SweepSpec(ranks=[1], lrs=[3e-3])
    trial = sweep_mod.pop_trial(study, url, tmp_path, spec)
    time.sleep(3.5)  # no beats since the pop: stale
    monkeypatch.setattr(sweep_mod._Health, "last_error", time.monotonic())
    assert sweep_mod.recover_interrupted(study, tmp_path) == 0
    monkeypatch.setattr(sweep_mod._Health, "last_error", 0.0)
    assert sweep_mod.recover_interrupted(study, tmp_path) == 1
    assert study.trials[trial.number].state == TrialState.FAIL


def test_grace_must_exceed_the_heartbeat(tmp_path):
    from lorank.errors import LorankError
    from lorank.sweep import open_study

    with pytest.raises(LorankError, match="need heartbeat >= 1 and grace > heartbeat"):
        open_study(tmp_path, None, prune=False, heartbeat=30, grace=30)
