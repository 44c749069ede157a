"""The budget of a dataset, kept across every run that reads it: a privacy ledger on SQLite or
PostgreSQL.

A team never trains once: searches, retries, next month's fine-tune, a prediction service and a
synthetic-data job all read the same sensitive dataset, and their privacy losses add up. A
:class:`PrivacyLedger` holds one dataset's total ``(epsilon, delta)``, fixed when the dataset is
created, and admits each run's charge by a Renyi-DP filter (:mod:`lightning_dp.core.rdp_filter`:
valid although each run is chosen after seeing the earlier ones' results).

* **Reserve before the first step.** A run reserves its planned charge (an RDP curve); if it
  does not fit in what remains the run is refused before touching the data.
* **Commit as it goes.** The executed part is committed (at checkpoints, at the end); an unused
  reservation is released when the run ends. A crash or ``kill -9`` never loses spend: a
  reservation never released stays counted.
* **Append-only, hash-chained.** Every entry carries the hash of the previous one, and the chain's
  head sits in the dataset's row, updated in the same transaction: :meth:`PrivacyLedger.verify`
  finds an entry edited, inserted or deleted in the middle. Someone with write access to the
  database can still cut the newest entries and rewind the head, or recompute every hash: set
  ``LIGHTNING_DP_LEDGER_KEY`` (kept outside the database) to chain with an HMAC, and keep the
  head hash that ``ledger show`` prints somewhere the database's writers cannot change.
* **Exact under concurrency.** An append takes the dataset's write lock (SQLite ``BEGIN
  IMMEDIATE``; PostgreSQL ``SELECT ... FOR UPDATE`` on the dataset's row), reads what is spent,
  decides and appends in one transaction: of racing runs, exactly those that fit are admitted.

SQLite (a file path) is the embedded default; on one host only (its locks do not hold on network
file systems). PostgreSQL (``postgresql://user@host/db``) is for a team on many machines (needs
``pip install lightning-dp[postgres]``). The schema and the critical section are one code path
through SQLAlchemy Core.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import math
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lightning_dp.core.integrity import KEY_VARIABLE, _key
from lightning_dp.core.rdp_filter import LEDGER_ORDERS, FilterRule

__all__ = ["datasets_in", "LedgerEntry", "LedgerError", "LedgerRefused", "LedgerTarget", "PrivacyLedger", "RunRecord"]

_GENESIS = "0" * 64
_KINDS = ("create", "reserve", "commit", "release", "total")


class LedgerError(ValueError):
    """A ledger that cannot be used as asked (other totals, a broken chain, an unknown run)."""


class LedgerRefused(RuntimeError):
    """A charge that does not fit in what remains of the dataset's budget."""


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    kind: str
    run_id: str
    body: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class RunRecord:
    """One run's record on a dataset."""

    run_id: str
    name: str
    kind: str
    status: str  # "reserved" (running, or crashed: its reservation still counts), "finished"
    epsilon: Optional[float]  # the run's own figure (its accountant's), as last committed
    steps: int
    started: float
    host: str
    committed: tuple[float, ...]
    outstanding: tuple[float, ...]
    lineage: str = ""  # the training run it continues (a checkpoint's run id): one per fit attempt
    last_seen: float = 0.0  # when it last wrote to the ledger
    overdraft: bool = False  # it executed more than it was admitted for (recorded, and stopped)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _entry_hash(prev_hash: str, dataset: str, seq: int, kind: str, run_id: str, body: dict[str, Any]) -> str:
    """SHA-256 of the entry and the previous hash; an HMAC with the key in
    ``LIGHTNING_DP_LEDGER_KEY`` when one is set (then only its holders can rewrite the chain)."""
    message = _canonical([prev_hash, dataset, seq, kind, run_id, body]).encode()
    key = _key()
    return hashlib.sha256(message).hexdigest() if key is None else hmac.new(key, message, hashlib.sha256).hexdigest()


def _tables() -> Any:
    from sqlalchemy import BigInteger, Column, MetaData, String, Table, Text

    metadata = MetaData()
    datasets = Table(
        "lightning_dp_datasets", metadata,
        Column("name", String(200), primary_key=True),
        Column("head_seq", BigInteger, nullable=False),
        Column("head_hash", String(64), nullable=False),
    )
    entries = Table(
        "lightning_dp_entries", metadata,
        Column("dataset", String(200), primary_key=True),
        Column("seq", BigInteger, primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("run_id", String(64), nullable=False),
        Column("body", Text, nullable=False),
        Column("prev_hash", String(64), nullable=False),
        Column("hash", String(64), nullable=False),
    )
    return metadata, datasets, entries


_METADATA, _DATASETS, _ENTRIES = _tables()


def make_engine(target: str, busy_timeout: float = 60.0) -> Any:
    """A SQLAlchemy engine for ``target``: a SQLite file path, or a ``postgresql://`` URL."""
    from sqlalchemy import create_engine, event

    if "://" not in target:
        engine = create_engine(f"sqlite:///{target}", connect_args={"timeout": busy_timeout})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the sqlite3 module (which would BEGIN only before the
            # first write, leaving the read outside the lock) and emit BEGIN IMMEDIATE ourselves.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")  # a committed charge survives a power loss
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if target.startswith("postgresql://") or target.startswith("postgres://"):
        target = "postgresql+psycopg://" + target.split("://", 1)[1]
    return create_engine(target, pool_pre_ping=True)


class LedgerTarget:
    """A planning target (:class:`~lightning_dp.core.accounting.PrivacyTarget`) that a run's
    history fits in what the ledger holds beside it: ``value <= 1`` exactly when the filter
    admits the run's curve on top of ``others``."""

    def __init__(self, rule: FilterRule, others: Any) -> None:
        self.rule = rule
        self.others = np.asarray(others, dtype=np.float64)

    @property
    def name(self) -> str:
        return "ledger"

    @property
    def limit(self) -> float:
        return 1.0

    def value(self, history: Any) -> float:
        from lightning_dp.core.accounting import rdp_curve

        total = self.others + np.asarray(rdp_curve(history, self.rule.orders), dtype=np.float64)
        caps = np.asarray(self.rule.capacities)
        active = caps > 0
        return float(np.min(total[active] / caps[active]))


class PrivacyLedger:
    """One dataset's privacy budget, shared by every run that reads it.

    Args:
        target: a SQLite file path (created if missing), or a ``postgresql://user@host/db`` URL.
        dataset: the dataset's name in the ledger.
        epsilon: the dataset's total epsilon: fixed when the dataset is created; opening it with
            another figure is an error (``python -m lightning_dp ledger set-total`` changes it,
            recorded). ``None``: open an existing dataset with its own totals.
        delta: the dataset's total delta (the same rules).
        orders: the Renyi orders charges are recorded at (fixed at creation).
        rule: the filter rule, ``"exists"`` or ``"single"`` (see :mod:`lightning_dp.core.rdp_filter`).
        order: the order of the ``"single"`` rule.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "privacy.db")
        >>> ledger = PrivacyLedger(path, dataset="patients-v3", epsilon=8.0, delta=1e-6)
        >>> from lightning_dp.core.events import GaussianRelease
        >>> from lightning_dp.core.history import Entry
        >>> charge = ledger.curve_of([Entry(GaussianRelease(3.0), 1)])  # one Gaussian release, sigma 3
        >>> run = ledger.reserve(charge, name="histogram", kind="release")
        >>> ledger.commit(run, charge, epsilon=1.9)
        >>> ledger.release(run)
        >>> 0 < ledger.spent() < 8.0, ledger.verify()
        (True, [])
    """

    def __init__(
        self,
        target: str,
        dataset: str,
        epsilon: Optional[float] = None,
        delta: Optional[float] = None,
        orders: Sequence[float] = LEDGER_ORDERS,
        rule: str = "exists",
        order: Optional[float] = None,
    ) -> None:
        if not isinstance(dataset, str) or not dataset or len(dataset) > 200:
            raise LedgerError(f"dataset must be a non-empty name of at most 200 characters, got {dataset!r}")
        self.target = str(target)
        self.dataset = dataset
        self._engine = make_engine(self.target)
        self.rule = self._created(epsilon, delta, orders, rule, order)

    def _created(self, epsilon: Optional[float], delta: Optional[float], orders: Sequence[float], rule: str,
                 order: Optional[float]) -> FilterRule:
        """Open the dataset, creating the tables and the dataset if needed. Processes that start
        together (DDP ranks) race to create them; PostgreSQL then refuses all but one with a
        duplicate key, and the others open what the winner created."""
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

        for attempt in range(10):
            try:
                _METADATA.create_all(self._engine)
                return self._open(epsilon, delta, orders, rule, order)
            except (IntegrityError, ProgrammingError, OperationalError) as err:
                if attempt == 9 or isinstance(err, OperationalError) and "locked" not in str(err):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ opening
    def _open(self, epsilon: Optional[float], delta: Optional[float], orders: Sequence[float], rule: str,
              order: Optional[float]) -> FilterRule:
        with self._engine.begin() as conn:
            existing = self._rule_in(conn)
            if existing is None:
                if epsilon is None or delta is None:
                    raise LedgerError(
                        f"The ledger {self.target} has no dataset {self.dataset!r}: give its total epsilon and delta "
                        "to create it."
                    )
                created = FilterRule(float(epsilon), float(delta), tuple(orders), rule, order)  # type: ignore[arg-type]
                from sqlalchemy import insert

                conn.execute(insert(_DATASETS).values(name=self.dataset, head_seq=0, head_hash=_GENESIS))
                self._append(conn, "create", "", {**created.to_dict(), "time": time.time(), "by": _who(),
                                                  "signed": _key() is not None})
                return created
        given = {"epsilon": epsilon, "delta": delta}
        for key, value in given.items():
            if value is not None and not math.isclose(float(value), getattr(existing, key), rel_tol=1e-12):
                raise LedgerError(
                    f"The dataset {self.dataset!r} in {self.target} has total {key}={getattr(existing, key)!r}, not "
                    f"{value!r}. A dataset's total is fixed when it is created; open it with its own figures (or "
                    "epsilon=None, delta=None), or change it explicitly: python -m lightning_dp ledger set-total."
                )
        return existing

    def _rule_in(self, conn: Any) -> Optional[FilterRule]:
        from sqlalchemy import select

        head = conn.execute(select(_DATASETS.c.head_seq).where(_DATASETS.c.name == self.dataset).with_for_update())
        if head.first() is None:
            return None
        rule = None
        for entry in self._entries(conn, kinds=("create", "total")):
            b = entry.body
            rule = FilterRule(b["epsilon"], b["delta"], tuple(b.get("orders") or (rule.orders if rule else LEDGER_ORDERS)),
                              b.get("rule") or (rule.rule if rule else "exists"),
                              b.get("order") if "order" in b else (rule.order if rule else None))
        return rule

    # ------------------------------------------------------------------ the chain
    def _entries(self, conn: Any, kinds: Optional[Sequence[str]] = None) -> list[LedgerEntry]:
        from sqlalchemy import select

        query = select(_ENTRIES).where(_ENTRIES.c.dataset == self.dataset).order_by(_ENTRIES.c.seq)
        if kinds is not None:
            query = query.where(_ENTRIES.c.kind.in_(list(kinds)))
        return [LedgerEntry(int(r.seq), r.kind, r.run_id, json.loads(r.body), r.prev_hash, r.hash)
                for r in conn.execute(query)]

    def _append(self, conn: Any, kind: str, run_id: str, body: dict[str, Any]) -> None:
        """Append one entry under the dataset's lock (the caller's transaction holds it)."""
        from sqlalchemy import insert, select, update

        seq, head = conn.execute(
            select(_DATASETS.c.head_seq, _DATASETS.c.head_hash).where(_DATASETS.c.name == self.dataset).with_for_update()
        ).one()
        seq = int(seq) + 1
        digest = _entry_hash(head, self.dataset, seq, kind, run_id, body)
        conn.execute(insert(_ENTRIES).values(dataset=self.dataset, seq=seq, kind=kind, run_id=run_id,
                                             body=_canonical(body), prev_hash=head, hash=digest))
        conn.execute(update(_DATASETS).where(_DATASETS.c.name == self.dataset).values(head_seq=seq, head_hash=digest))

    def verify(self) -> list[str]:
        """Problems found in the dataset's chain (``[]``: intact): an entry edited, inserted or
        deleted, or a head that does not match the last entry."""
        from sqlalchemy import select

        problems: list[str] = []
        with self._engine.begin() as conn:  # under the dataset's lock: no append between the two reads
            row = conn.execute(select(_DATASETS).where(_DATASETS.c.name == self.dataset).with_for_update()).first()
            entries = self._entries(conn)
        if row is None:
            return [f"no dataset {self.dataset!r}"]
        prev, expected_seq = _GENESIS, 1
        for entry in entries:
            if entry.seq != expected_seq:
                problems.append(f"entry {expected_seq} is missing (next is {entry.seq})")
            if entry.prev_hash != prev:
                problems.append(f"entry {entry.seq} does not follow the entry before it")
            if _entry_hash(entry.prev_hash, self.dataset, entry.seq, entry.kind, entry.run_id, entry.body) != entry.hash:
                problems.append(f"entry {entry.seq} ({entry.kind}) was edited after it was written")
            prev, expected_seq = entry.hash, entry.seq + 1
        if int(row.head_seq) != expected_seq - 1 or row.head_hash != prev:
            problems.append(f"the chain's head (entry {row.head_seq}) is not its last entry ({expected_seq - 1}): "
                            "entries were deleted or added around the lock")
        signed = bool(entries and entries[0].body.get("signed"))
        if signed != (_key() is not None):
            problems.append(f"the chain was written {'with' if signed else 'without'} a key in {KEY_VARIABLE}, and is "
                            f"checked {'without' if signed else 'with'} one")
        return problems

    def head(self) -> str:
        """The hash of the newest entry: keep it where the database's writers cannot change it
        (a later :meth:`verify` plus this hash shows that no entry was cut or rewritten)."""
        from sqlalchemy import select

        with self._engine.connect() as conn:
            row = conn.execute(select(_DATASETS.c.head_seq, _DATASETS.c.head_hash)
                               .where(_DATASETS.c.name == self.dataset)).one()
        return f"{int(row.head_seq)}:{row.head_hash}"

    # ------------------------------------------------------------------ spending
    def curve_of(self, history: Any) -> np.ndarray:
        """A history's RDP curve at the ledger's orders."""
        from lightning_dp.core.accounting import rdp_curve

        return np.asarray(rdp_curve(history, self.rule.orders), dtype=np.float64)

    def _state(self, conn: Any) -> tuple[FilterRule, dict[str, dict[str, Any]]]:
        rule = self._rule_in(conn)
        assert rule is not None
        runs: dict[str, dict[str, Any]] = {}
        zero = np.zeros(len(rule.orders))
        for entry in self._entries(conn, kinds=("reserve", "commit", "release")):
            run = runs.setdefault(entry.run_id, {"reserved": zero.copy(), "committed": zero.copy(), "info": {},
                                                 "status": "reserved", "epsilon": None, "steps": 0,
                                                 "last_seen": 0.0, "overdraft": False})
            amount = np.asarray(entry.body.get("curve", zero), dtype=np.float64)
            run["last_seen"] = max(run["last_seen"], float(entry.body.get("time") or 0.0))
            run["overdraft"] = run["overdraft"] or bool(entry.body.get("overdraft"))
            if entry.kind == "reserve":
                run["reserved"] = run["reserved"] + amount
                run["status"] = "reserved"
                if not run["info"]:
                    run["info"] = {k: entry.body.get(k) for k in ("name", "kind", "host", "time", "lineage")}
            elif entry.kind == "commit":
                run["committed"] = run["committed"] + amount
                run["epsilon"] = entry.body.get("epsilon", run["epsilon"])
                run["steps"] = int(entry.body.get("steps", run["steps"]))
            else:
                run["reserved"] = np.where(np.isinf(amount), run["committed"], run["reserved"] - amount)
                run["status"] = "finished"
        return rule, runs

    @staticmethod
    def _spent_curve(runs: dict[str, dict[str, Any]], size: int, excluding: str = "") -> np.ndarray:
        total = np.zeros(size)
        for run_id, run in runs.items():
            if run_id != excluding:
                total = total + np.maximum(run["reserved"], run["committed"])
        return total

    def reserve(self, curve: Any, name: str = "", kind: str = "training", run_id: Optional[str] = None,
                lineage: str = "") -> str:
        """Reserve ``curve`` for a run (a new one, or ``run_id`` to raise an existing run's
        reservation to at least ``curve`` in total); returns the run's id. ``lineage`` names the
        training run a fit attempt continues (see :meth:`lineage_committed`). Raises
        :class:`LedgerRefused` when it does not fit, with the figures."""
        curve = self._check_curve(curve)
        run_id = run_id or uuid.uuid4().hex
        with self._engine.begin() as conn:
            rule, runs = self._state(conn)
            mine = runs.get(run_id)
            have = np.zeros(len(rule.orders)) if mine is None else np.maximum(mine["reserved"], mine["committed"])
            extra = np.maximum(curve - have, 0.0)
            if mine is not None and mine["status"] == "reserved" and not np.any(extra > 0):
                return run_id
            others = self._spent_curve(runs, len(rule.orders), excluding=run_id)
            if not rule.admits(others + have, extra):
                raise LedgerRefused(self._refusal(rule, others + have, extra, name))
            self._append(conn, "reserve", run_id, {"curve": extra.tolist(), "name": name, "kind": kind, "host": _who(),
                                                   "time": time.time(), "lineage": lineage})
        return run_id

    def commit(self, run_id: str, executed: Any, epsilon: Optional[float] = None, steps: int = 0) -> None:
        """Record that the run has executed ``executed`` in total (its RDP curve so far; what was
        committed before is never lowered). Spend that happened is always recorded: when it goes
        beyond what the run was admitted for (it outgrew its reservation and the rest does not fit,
        or someone released the run while it was still running), the entry is marked as an
        overdraft and :class:`LedgerRefused` is raised afterwards so that the run stops."""
        executed = self._check_curve(executed)
        problem: Optional[str] = None
        with self._engine.begin() as conn:
            rule, runs = self._state(conn)
            run = runs.get(run_id)
            if run is None:
                raise LedgerError(f"No run {run_id!r} on dataset {self.dataset!r}: reserve before committing.")
            increment = np.maximum(executed - run["committed"], 0.0)
            name = run["info"].get("name") or run_id[:12]
            if run["status"] == "finished" and np.any(increment > 0):
                problem = (f"Run {name!r} on dataset {self.dataset!r} was released (ended, or reconciled by someone) "
                           "but is still taking private steps: its spend is recorded and it must stop.")
            else:
                held = np.maximum(run["reserved"], run["committed"])
                beyond = np.maximum(run["committed"] + increment - held, 0.0)
                if np.any(beyond > 1e-12 * np.maximum(executed, 1.0)):
                    others = self._spent_curve(runs, len(rule.orders), excluding=run_id)
                    if not rule.admits(others + held, beyond):
                        problem = self._refusal(rule, others + held, beyond, name) + " The run's spend is recorded."
            body: dict[str, Any] = {"curve": increment.tolist(), "epsilon": epsilon, "steps": int(steps),
                                    "time": time.time()}
            if problem is not None:
                body["overdraft"] = True
            self._append(conn, "commit", run_id, body)
        if problem is not None:
            raise LedgerRefused(problem)

    def release(self, run_id: str) -> None:
        """End the run: what it reserved beyond what it committed is freed."""
        with self._engine.begin() as conn:
            _, runs = self._state(conn)
            run = runs.get(run_id)
            if run is None or run["status"] == "finished":
                return
            unused = _unused(run["reserved"], run["committed"])
            self._append(conn, "release", run_id, {"curve": unused.tolist(), "time": time.time()})

    def reconcile(self, run_id: str, executed: Any, epsilon: Optional[float] = None, steps: int = 0,
                  min_idle: float = 3600.0) -> None:
        """Close a run that crashed: commit what it executed and release the rest of its
        reservation. ``executed`` must cover every step the run took (a checkpoint shows only the
        steps before it was written: a killed run may have taken more); it never lowers what was
        committed. A run that wrote to the ledger less than ``min_idle`` seconds ago may still be
        running and is refused."""
        records = {r.run_id: r for r in self.runs()}
        record = records.get(run_id)
        if record is None:
            raise LedgerError(f"No run {run_id!r} on dataset {self.dataset!r}.")
        idle = time.time() - record.last_seen
        if record.status == "reserved" and idle < min_idle:
            raise LedgerError(
                f"Run {record.name or run_id[:12]!r} wrote to the ledger {idle:.0f} s ago: it may still be running, and "
                f"releasing its reservation would let others spend budget it is using. Reconcile a run idle for at least "
                f"min_idle={min_idle:g} s."
            )
        self.commit(run_id, executed, epsilon, steps)
        self.release(run_id)

    def lineage_committed(self, lineage: str) -> np.ndarray:
        """What every fit attempt of the training run ``lineage`` committed together: the steps
        of that run the ledger has already charged (a resume charges only the rest)."""
        with self._engine.begin() as conn:
            rule, runs = self._state(conn)
        total = np.zeros(len(rule.orders))
        for run in runs.values():
            if run["info"].get("lineage") == lineage:
                total = total + run["committed"]
        return total

    def set_total(self, epsilon: float, delta: float) -> None:
        """Change the dataset's total (an explicit act, recorded in the chain)."""
        with self._engine.begin() as conn:
            old, runs = self._state(conn)
            new = FilterRule(float(epsilon), float(delta), old.orders, old.rule, old.order)
            spent = self._spent_curve(runs, len(old.orders))
            if np.any(spent > 0) and not new.admits(spent, np.zeros(len(old.orders))):
                raise LedgerError(
                    f"A total of ({epsilon:g}, {delta:g}) is below what dataset {self.dataset!r} has already spent or "
                    f"holds in reservations ({new.epsilon_spent(spent):.3g} by the new total's filter): spend cannot be "
                    "undone. Keep the total, or lower it only to at least what is spent."
                )
            self._append(conn, "total", "", {**new.to_dict(), "time": time.time(), "by": _who(),
                                              "previous": {"epsilon": old.epsilon, "delta": old.delta}})
            self.rule = new

    # ------------------------------------------------------------------ reading
    def spent_curve(self) -> np.ndarray:
        """Committed spend plus outstanding reservations, at each order."""
        with self._engine.begin() as conn:
            rule, runs = self._state(conn)
        self.rule = rule
        return self._spent_curve(runs, len(rule.orders))

    def spent(self) -> float:
        """How much of the dataset's epsilon is used, at its delta, by the filter's figure
        (reservations count): a progress figure to compare with the total, not a guarantee to
        publish; the guarantee of every run admitted is the dataset's total."""
        curve = self.spent_curve()  # re-reads the rule: another process may have changed the total
        return self.rule.epsilon_spent(curve)

    def remaining(self) -> float:
        """The dataset's epsilon minus :meth:`spent` (what a next run can still be planned for
        is decided by the filter, see :meth:`planning_target`)."""
        return max(self.rule.epsilon - self.spent(), 0.0)

    def planning_target(self, run_id: Optional[str] = None) -> LedgerTarget:
        """A planning target: a run (``run_id``'s own reservation left out) fits beside the rest."""
        with self._engine.begin() as conn:
            rule, runs = self._state(conn)
        return LedgerTarget(rule, self._spent_curve(runs, len(rule.orders), excluding=run_id or ""))

    def committed(self, run_id: str) -> Optional[np.ndarray]:
        """What ``run_id`` has committed so far (its RDP curve), or ``None`` for an unknown run."""
        with self._engine.begin() as conn:
            _, runs = self._state(conn)
        run = runs.get(run_id)
        return None if run is None else np.asarray(run["committed"])

    def runs(self) -> list[RunRecord]:
        """Each run's record, in the order they started."""
        with self._engine.begin() as conn:
            _, runs = self._state(conn)
        out = []
        for run_id, run in runs.items():
            info = run["info"]
            outstanding = _unused(run["reserved"], run["committed"]) if run["status"] == "reserved" else 0 * run["committed"]
            out.append(RunRecord(run_id, str(info.get("name") or ""), str(info.get("kind") or ""), run["status"],
                                 run["epsilon"], run["steps"], float(info.get("time") or 0.0), str(info.get("host") or ""),
                                 tuple(run["committed"].tolist()), tuple(outstanding.tolist()),
                                 str(info.get("lineage") or ""), run["last_seen"], run["overdraft"]))
        return out

    def summary(self) -> dict[str, Any]:
        """The figures the privacy report shows."""
        spent = self.spent()
        return {"target": _redacted(self.target), "dataset": self.dataset, "epsilon": self.rule.epsilon,
                "delta": self.rule.delta, "spent": spent, "remaining": max(self.rule.epsilon - spent, 0.0),
                "rule": self.rule.rule}

    def close(self) -> None:
        self._engine.dispose()

    # ------------------------------------------------------------------ helpers
    def _check_curve(self, curve: Any) -> np.ndarray:
        array = np.asarray(curve, dtype=np.float64)
        if array.shape != (len(self.rule.orders),) or np.any(np.isnan(array)) or np.any(array < 0):
            raise LedgerError(f"A charge is an RDP curve of {len(self.rule.orders)} non-negative values at the ledger's "
                              f"orders, got shape {array.shape}")
        return array

    def _refusal(self, rule: FilterRule, spent: np.ndarray, charge: np.ndarray, name: str) -> str:
        alone = rule.epsilon_spent(charge)
        return (
            f"The privacy ledger refuses {('run ' + repr(name)) if name else 'this charge'} on dataset {self.dataset!r}: "
            f"its charge (epsilon {alone:.3g} alone at the dataset's delta) does not fit in what remains. The dataset's "
            f"total is ({rule.epsilon:g}, {rule.delta:g}); runs so far spent or hold epsilon {rule.epsilon_spent(spent):.3g} "
            "by the ledger's filter. Plan fewer steps or more noise (PrivacyBudget(epsilon=None, ledger=...) calibrates "
            "to what remains). Its total is the dataset owner's decision, not a run's."
        )


def _unused(reserved: np.ndarray, committed: np.ndarray) -> np.ndarray:
    """Reserved beyond committed (an infinite charge at an order, fully used, leaves 0 there)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(reserved) & np.isinf(committed), 0.0, np.maximum(reserved - committed, 0.0))


def datasets_in(target: str) -> list[str]:
    """The datasets a ledger holds."""
    from sqlalchemy import inspect, select

    engine = make_engine(str(target))
    try:
        if not inspect(engine).has_table(_DATASETS.name):
            return []
        with engine.connect() as conn:
            return [str(r.name) for r in conn.execute(select(_DATASETS.c.name).order_by(_DATASETS.c.name))]
    finally:
        engine.dispose()


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "?"
    return f"{user}@{socket.gethostname()}"


def _redacted(target: str) -> str:
    """A URL without its password."""
    if "://" in target and "@" in target:
        scheme, rest = target.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
    return target
