"""Small real models and data for the tests (CPU, no downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(n: int = 64, d: int = 6, k: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 8, **kw: Any) -> DataLoader:
    kw.setdefault("shuffle", True)
    return DataLoader(ds, batch_size=batch_size, **kw)


class Classifier(L.LightningModule):
    """A small MLP. Records every training batch it sees so tests can recompute the update."""

    def __init__(self, d: int = 6, k: int = 3, hidden: int = 8, lr: float = 1.0, reduction: str = "mean",
                 optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))
        self.lr = lr
        self.reduction = reduction
        self.optimizer = optimizer
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.training_step_calls = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), y, reduction=self.reduction)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.training_step_calls += 1
        self.seen.append((x.detach().clone(), y.detach().clone()))
        loss = self.loss(x, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(x, y).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Batches(L.Callback):
    """Record what the training loop trained on: each step's Poisson draw (``batches``: its
    chunks and sizes, from the strategy) and the batch the hooks received (``seen``: the user's
    own format). The start-of-fit check's own calls to training_step are not part of training."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.seen: list[Any] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.seen.append(batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(trainer.strategy.last_draw)

    @property
    def examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = [c for b in self.batches for c in b.chunks]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    @property
    def sizes(self) -> list[int]:
        return [b.size for b in self.batches]


def trainer(**kw: Any) -> L.Trainer:
    """A quiet CPU Trainer."""
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("accelerator", "cpu")
    return L.Trainer(**kw)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> list[list[torch.Tensor]]:
    """Brute force: one backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        loss = loss_fn(x[i : i + 1], y[i : i + 1]).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def clipped_sum(grads: list[list[torch.Tensor]], c: float, like: list[torch.Tensor]) -> list[torch.Tensor]:
    total = [torch.zeros_like(p) for p in like]
    for g in grads:
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g)).item()
        f = min(1.0, c / (norm + 1e-6))
        total = [a + f * t for a, t in zip(total, g)]
    return total


@pytest.fixture(autouse=True)
def _seed() -> None:
    L.seed_everything(0, verbose=False)


@pytest.fixture(autouse=True)
def _reproducible_entropy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library seeds its noise and Poisson draws from OS entropy (secrets.randbits), so no
    run replays another's. In this process, tests draw that "entropy" from a generator seeded by
    the test's name instead: every call still gets a fresh value (streams, fits and steps still
    differ), and a statistical test passes or fails the same way every time. Subprocess tests
    (tests/noise_run.py, tests/ddp_run.py) use the real OS entropy."""
    import random
    import secrets

    generator = random.Random(request.node.nodeid)
    monkeypatch.setattr(secrets, "randbits", generator.getrandbits)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trainers without a logger write lightning_logs/ and privacy_report.* into the working
    # directory: keep them out of the checkout.
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


def pld_epsilon(segments: list[tuple[float, float, int]], delta: float) -> float:
    """Google's dp_accounting PLD accountant: the independent oracle for our figures."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


class Data(L.LightningDataModule):
    """Synthetic classification data as a DataModule (for LightningCLI)."""

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(make_dataset(n=self.n), batch_size=self.batch_size)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]




@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on a 2-core machine shared with other jobs, two threads make each
    tiny step of a small model hundreds of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event file under ``logdir``: ``{tag: [(step, value)]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def no_spot_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No spot check during training (they call training_step at random steps): for tests that
    count the calls of training_step or of the transfer hooks."""
    import lightning_dp.lightning.private_step as private_step

    monkeypatch.setattr(private_step, "SPOT_CHECK_EVERY", 1 << 62)


# ---------------------------------------------------------------------- PostgreSQL for the ledger
@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """A real PostgreSQL server for the session: ``LEDGER_TEST_PG_URL`` if set (an existing server
    whose user may CREATE DATABASE), else a throwaway one started from the machine's PostgreSQL
    binaries (tests/postgres_server.py). No server is a failure, never a skip: the ledger's
    PostgreSQL back-end is part of what `make test` checks."""
    import os

    external = os.environ.get("LEDGER_TEST_PG_URL")
    if external:
        yield external
        return
    from postgres_server import PostgresUnavailable, TempPostgres

    try:
        server = TempPostgres().start()
    except PostgresUnavailable as err:
        pytest.fail(
            f"The ledger tests need a PostgreSQL server and found none ({err}). Install PostgreSQL's server "
            "binaries (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@16), set "
            "PG_BINDIR to their directory, or set LEDGER_TEST_PG_URL=postgresql://user@host:port/db."
        )
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> Any:
    """A fresh database on the session's server, dropped afterwards."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    base, _, rest = postgres_server.partition("://")
    host, _, _ = rest.partition("/")
    try:
        yield f"{base}://{host}/{name}"
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Where a test's ledger lives: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "privacy.db")
    return str(request.getfixturevalue("postgres_url"))
