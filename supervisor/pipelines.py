"""Moves pipeline runs from one stage to the next.

A stage's batch can only be created once the stage before it has ended (a batch
is created with its items, and they come from the previous stage's results).
Every daemon runs this component. It takes a running run whose current stage's
batch has ended (row-locked, skipping locked rows: daemons pass each other's
runs by), and in that one transaction either ends the run or calls the next stage's
configured items function over the ended stage's succeeded results and creates
the next stage's batch with its stage row. The row's primary key (run_id,
stage) is the guarantee of one batch per stage; a daemon killed at any moment
leaves either both or neither, and the next pass (any daemon) does it again.

Woken by the batch channel when a batch ends, polling as the backstop.

The items function is called in a worker thread with an iterator of result
records ({id, key, status, attempts, result, error}, read page by page) and
returns or yields item entries, as in a submission's ``items``. It raises, or
returns entries a submission would refuse: the run fails with the error stored
on it. It returns none: the stage and every later one are skipped, and the run
completes.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import asyncpg

from supervisor import db as dbm
from supervisor import pipeline_runs, states, store
from supervisor.api import results, schemas
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable, HandlerLoadError
from supervisor.events import Wakeup

log = logging.getLogger(__name__)
IDLE_S = 5.0  # with LISTEN working, a batch's end is announced; this is the backstop
ERROR_TEXT_MAX = 4000

ItemsFunction = Callable[[Iterator[dict[str, Any]]], Iterable[Any] | None]


def load_function(ref: str) -> ItemsFunction:
    """The items function ``ref`` ("package.module:function") names; ValueError
    saying why when it cannot be used."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # any import-time failure makes the function unusable
        raise ValueError(f"cannot load {ref!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"{ref!r} is not callable")
    fn: ItemsFunction = obj
    return fn


def load_functions(cfg: Config) -> dict[str, ItemsFunction]:
    """Every configured items function, imported; HandlerLoadError naming each
    that cannot be (a daemon refuses to start, as with a broken handler)."""
    out: dict[str, ItemsFunction] = {}
    problems: list[str] = []
    for p in cfg.pipelines.values():
        for i, st in enumerate(p.stages):
            if st.items is None or st.items in out:
                continue
            try:
                out[st.items] = load_function(st.items)
            except ValueError as exc:
                problems.append(f"pipelines.{p.name}.stages[{i}].items: {exc}")
    if problems:
        raise HandlerLoadError("; ".join(problems))
    return out


def _text(value: object) -> str:
    """An error text PostgreSQL can store, of bounded size."""
    return str(value).replace("\x00", "\ufffd")[:ERROR_TEXT_MAX]


class StageItemsError(Exception):
    """The items of a stage could not be derived; ``error`` is stored on the run."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


class Pipelines:
    def __init__(
        self,
        cfg: Config,
        db: dbm.Database,
        functions: Mapping[str, ItemsFunction],
        listening: Callable[[], bool],
    ) -> None:
        self._cfg = cfg
        self._db = db
        self._functions = dict(functions)
        self._listening = listening
        self._wakeup = Wakeup()
        self._actor = f"pipelines:{cfg.worker.name}"
        # Runs of pipelines this daemon is not configured with are left to the
        # daemons that are: their stages' handlers may be unknown here.
        self._pipelines = sorted(cfg.pipelines)

    def wake(self) -> None:
        """A batch ended (or the listen session came back): look for runs to advance."""
        self._wakeup.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        if not self._pipelines:
            await anyio.sleep_forever()  # no pipeline configured: no run is ours to move
        while True:
            try:
                await self.advance_all()
            except DatabaseUnavailable as exc:
                # Not fatal: the runs are in the database, and the next pass acts on them.
                log.warning("pipelines.failed error=%s", exc)
            cap = IDLE_S if self._listening() else self._cfg.worker.poll_interval_s
            await self._wakeup.wait(cap)

    async def advance_all(self) -> int:
        """Advance every run that is due and not held by another daemon; how many."""
        n = 0
        while await self.advance_one():
            n += 1
        return n

    async def advance_one(self) -> bool:
        """Advance one due run in one transaction; False when none is due here."""
        run: store.RunRow | None = None
        try:
            async with self._db.transaction("advance_pipeline") as tx:
                q = store.Queries(tx)
                claimed = await q.claim_pipeline_run(pipelines=self._pipelines)
                if claimed is None:
                    return False
                run = claimed[0]
                await self._advance(tx, q, run)
        except asyncpg.UniqueViolationError as exc:
            # The stage has its row already: nothing was written. Cannot happen
            # under the run's lock; the primary key is the guarantee if it did.
            log.error("pipelines.stage_exists error=%s", exc)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            # A poison run (whatever it makes the database or this code refuse)
            # must not crash every daemon that takes it: it fails, with the error.
            if run is None:
                raise
            log.exception("pipelines.advance_failed run=%s", run.id)
            await self._fail(run, exc)
        return True

    async def _fail(self, run: store.RunRow, exc: Exception) -> None:
        """End a run whose advance raised, unless it moved on meanwhile."""
        specs = pipeline_runs.specs_of(run)
        stage = specs[min(run.current_stage + 1, len(specs) - 1)]["name"]
        async with self._db.transaction("fail_pipeline") as tx:
            q = store.Queries(tx)
            now = await q.lock_pipeline_run(run.id, tenant=None)
            if (
                now is not None
                and now.status == states.RunStatus.RUNNING
                and now.current_stage == run.current_stage
            ):
                error = {"stage": stage, "type": type(exc).__name__, "message": _text(exc)}
                await self._finish(q, now, states.RunStatus.FAILED, error)

    async def _advance(self, tx: dbm.Tx, q: store.Queries, run: store.RunRow) -> bool:
        """End the run or create its next stage."""
        specs = pipeline_runs.specs_of(run)
        k = run.current_stage
        rows = {r.stage: r for r in await q.pipeline_stage_rows([run.id])}
        current = rows.get(k)
        if current is None or max(rows) != k:
            # Cannot happen (a stage row and the run's move to it are one
            # statement); if it did, the run fails rather than stand first in
            # every daemon's queue for ever.
            log.error("pipelines.inconsistent run=%s stage=%s", run.id, k)
            return await self._finish(
                q,
                run,
                states.RunStatus.FAILED,
                {"stage": specs[k]["name"], "message": "the run's stage rows disagree with it"},
            )
        status = current.batch_status
        name = specs[k]["name"]
        degraded = run.degraded
        if status is None:
            return await self._finish(
                q,
                run,
                states.RunStatus.FAILED,
                {"stage": name, "message": "the stage's batch was deleted before the run moved on"},
            )
        if run.cancel_requested or status == states.BatchStatus.CANCELLED:
            return await self._finish(q, run, states.RunStatus.CANCELLED, None)
        if status != states.BatchStatus.COMPLETED:
            if run.on_stage_failure == states.StageFailure.STOP:
                return await self._finish(
                    q,
                    run,
                    states.RunStatus.FAILED,
                    {"stage": name, "message": f"stage {name!r} ended {status}"},
                )
            if not degraded:
                degraded = True
                await q.set_pipeline_run_flags(run.id, degraded=True)
        done = states.RunStatus.COMPLETED_WITH_ERRORS if degraded else states.RunStatus.COMPLETED
        if k == len(specs) - 1:
            return await self._finish(q, run, done, None)
        nxt = specs[k + 1]
        assert current.batch_id is not None  # a running run's current stage has a batch
        try:
            items, limit_keys = await self._derive(q, nxt, current.batch_id)
        except StageItemsError as exc:
            return await self._finish(q, run, states.RunStatus.FAILED, exc.error)
        if not items:
            await q.insert_pipeline_stage(run.id, stage=k + 1, batch_id=None)
            log.info("pipelines.stage_skipped run=%s stage=%s", run.id, nxt["name"])
            return await self._finish(q, run, done, None)
        try:
            bid = await pipeline_runs.write_stage(
                tx,
                self._db.schema,
                self._cfg,
                run,
                k + 1,
                items,
                actor=self._actor,
                limit_keys=limit_keys,
            )
        except pipeline_runs.StageUnavailable as exc:
            return await self._finish(
                q, run, states.RunStatus.FAILED, {"stage": nxt["name"], "message": str(exc)}
            )
        log.info(
            "pipelines.stage_started run=%s stage=%s batch=%s items=%s",
            run.id,
            nxt["name"],
            bid,
            len(items),
        )
        return True

    async def _finish(
        self,
        q: store.Queries,
        run: store.RunRow,
        status: states.RunStatus,
        error: dict[str, Any] | None,
    ) -> bool:
        await q.finish_pipeline_run(
            run.id, status=status, error=json.dumps(error) if error is not None else None
        )
        log.info("pipelines.run_ended run=%s status=%s", run.id, status)
        return True

    async def _derive(
        self, q: store.Queries, spec: dict[str, Any], batch_id: Any
    ) -> tuple[list[tuple[str | None, str]], list[str] | None]:
        """The stage's items from the ended stage's succeeded results: its items
        function, in a worker thread, reading the results page by page; and their
        limit keys when the stage's handler has a key_limit."""
        ref = spec["items"]
        stage = spec["name"]
        fn = self._functions.get(ref)
        if fn is None:
            # A run keeps its stages as they were configured at its submission:
            # its function may be one this daemon's configuration no longer names.
            try:
                fn = self._functions[ref] = load_function(ref)
            except ValueError as exc:
                raise StageItemsError(
                    {"stage": stage, "type": "ItemsFunctionUnavailable", "message": str(exc)}
                ) from None

        open_tx = True  # cleared when this call ends: see below

        async def page(after: int) -> list[store.ItemResult]:
            if not open_tx:
                # A thread abandoned at shutdown must not reach the transaction's
                # connection: it is back in the pool, someone else's by now.
                raise RuntimeError("the transaction deriving the stage has ended")
            return await q.item_results(
                batch_id=batch_id, statuses=["succeeded"], after=after, limit=results.PAGE_ROWS
            )

        def records() -> Iterator[dict[str, Any]]:
            after = 0
            while True:
                rows = anyio.from_thread.run(page, after)
                for r in rows:
                    yield results.record(r, tracebacks=False)
                if len(rows) < results.PAGE_ROWS:
                    return
                after = rows[-1].id

        limit = self._cfg.server.max_items_per_batch

        def call() -> list[Any]:
            out = fn(records())
            entries: list[Any] = []
            for entry in out or ():
                entries.append(entry)
                if len(entries) > limit:
                    break
            return entries

        try:
            entries = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            open_tx = False
            raise
        except DatabaseUnavailable:
            raise  # reading the results failed: not the function's fault, try again later
        except Exception as exc:  # the function's own failure fails the run, with its error
            raise StageItemsError(
                {"stage": stage, "type": type(exc).__name__, "message": _text(exc)}
            ) from exc
        if len(entries) > limit:
            raise StageItemsError(
                {
                    "stage": stage,
                    "type": "TooManyItems",
                    "message": f"more than {limit} items ([server] max_items_per_batch)",
                }
            )
        errors: list[dict[str, str]] = []
        hcfg = self._cfg.handlers.get(spec["handler"])
        kl = hcfg.key_limit if hcfg is not None else None
        limit_keys: list[str] | None = [] if kl is not None else None
        items = schemas.item_entries(
            entries,
            errors,
            path="/items",
            key_limit=(kl.key, kl.tokens) if kl is not None else None,
            limit_keys=limit_keys,
        )
        if errors:
            raise StageItemsError(
                {
                    "stage": stage,
                    "type": "InvalidItems",
                    "message": f"items function {ref!r} returned items a submission refuses",
                    "errors": errors,
                }
            )
        return items, limit_keys
