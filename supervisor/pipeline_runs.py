"""Pipeline runs, shared by the API and the pipelines component: submission (the
run row, its first stage's batch and that stage's row, all or nothing), a
stage's batch written in the caller's transaction, the run's JSON, and the
controls, each taken under the run's row lock and applied to the batch of the
run's current stage through the batch controls.

Lock order: the run's row, then its stage's batch (the component advancing a
run holds the same lock), so a control and an advance of one run are serialised
and never deadlock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from supervisor import batches, models, states, store
from supervisor import db as dbm
from supervisor.config import Config, PipelineConfig

KEY_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class NewRun:
    """A validated POST /v1/pipelines/{name}/runs (see api/schemas.py)."""

    pipeline: str
    items: Sequence[tuple[str | None, str]]  # (key, payload as JSON text)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    idempotency_key: str | None = None
    exclusive_key: str | None = None
    # the items' limit keys when the first stage's handler has a key_limit; derived
    # from the payloads, so not part of the request digest
    limit_keys: Sequence[str] | None = None

    def request_hash(self) -> str:
        """Digest of the content, to tell an idempotent repeat from a conflicting one."""
        head = {"pipeline": self.pipeline, "metadata": self.metadata, "key": self.exclusive_key}
        h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        h.update("\x1e".join(f"{key or ''}\x1f{payload}" for key, payload in self.items).encode())
        return h.hexdigest()


class RunIdempotencyConflict(Exception):
    def __init__(self, run_id: uuid.UUID) -> None:
        super().__init__(
            f"idempotency key already used by pipeline run {run_id} with other content"
        )
        self.run_id = run_id


class RunKeyBusy(Exception):
    """A running run of the tenant holds the exclusive key."""

    def __init__(self, key: str, run_id: uuid.UUID) -> None:
        super().__init__(
            f"exclusive key {key!r} is held by pipeline run {run_id}; it is free again once "
            "that run has ended"
        )
        self.key = key
        self.run_id = run_id


class RunConflict(Exception):
    """A control that does not apply to the run as it is (a 409)."""


class StageUnavailable(Exception):
    """A stage's handler is not configured on this daemon: its batch cannot be made."""


def stage_specs(p: PipelineConfig) -> list[dict[str, Any]]:
    """The stage definitions a run keeps (pipeline_runs.stages)."""
    return [{"name": s.name, "handler": s.handler, "items": s.items} for s in p.stages]


def specs_of(run: store.RunRow) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = json.loads(run.stages)
    return specs


async def write_stage(
    tx: dbm.Tx,
    schema: str,
    cfg: Config,
    run: store.RunRow,
    stage: int,
    items: Sequence[tuple[str | None, str]],
    *,
    actor: str,
    limit_keys: Sequence[str] | None = None,
) -> uuid.UUID:
    """The stage's batch (through the submission path of POST /v1/batches) and
    its stage row, in the caller's transaction, which holds the run's row lock.
    The stage row's primary key refuses a second batch for the stage."""
    spec = specs_of(run)[stage]
    hcfg = cfg.handlers.get(spec["handler"])
    if hcfg is None:
        raise StageUnavailable(f"no handler {spec['handler']!r} in this daemon's configuration")
    marker = {"id": str(run.id), "pipeline": run.pipeline, "stage": spec["name"], "index": stage}
    nb = batches.NewBatch(
        handler=hcfg.name,
        items=items,
        metadata=models.loads(run.metadata) | {"pipeline_run": marker},
        limit_keys=limit_keys,
    )
    row = batches.new_row(
        nb,
        tenant=run.tenant,
        actor=actor,
        attempt_budget=hcfg.max_attempts,
        callback_handler=hcfg.on_complete,
        digest=None,
    )
    b = await batches.write_in(
        tx, schema, nb, row, budget=hcfg.max_attempts, created=batches.created_detail(nb)
    )
    if b is None:  # no idempotency or exclusive key: only a fresh uuid colliding could refuse it
        raise RuntimeError(f"the batch of stage {stage} of run {run.id} was refused")
    q = store.Queries(tx)
    if run.paused:  # a paused run's new stage starts paused, before any claim can see it
        await q.pause_batch(b.id, tenant=None, actor=actor, pause=True)
    await q.insert_pipeline_stage(run.id, stage=stage, batch_id=b.id)
    return b.id


# Runs first in a run's submitting transaction, with the new run's id (a
# schedule's slot claim); whatever it raises undoes the submission.
InTransaction = Callable[[store.Queries, uuid.UUID], Awaitable[None]]


class _Refused(Exception):
    """A unique index refused the run: raised to undo what ``in_tx`` wrote."""


async def submit(
    db: dbm.Database,
    cfg: Config,
    nr: NewRun,
    *,
    tenant: str,
    actor: str,
    in_tx: InTransaction | None = None,
) -> tuple[store.RunRow, bool]:
    """The run with its first stage's batch, all or nothing; (run, created), where
    created is False for an idempotent repeat. ``in_tx`` runs first in the same
    transaction."""
    p = cfg.pipelines[nr.pipeline]
    digest = nr.request_hash() if nr.idempotency_key is not None else None
    q0 = store.Queries(db)
    for _ in range(KEY_ROUNDS):
        new = store.NewRunRow(
            id=uuid.uuid4(),
            tenant=tenant,
            pipeline=p.name,
            stages=json.dumps(stage_specs(p)),
            on_stage_failure=p.on_stage_failure,
            metadata=json.dumps(nr.metadata),
            idempotency_key=nr.idempotency_key,
            request_hash=digest,
            exclusive_key=nr.exclusive_key,
            created_by=actor,
        )
        try:
            async with db.transaction("submit_run") as tx:
                q = store.Queries(tx)
                if in_tx is not None:
                    await in_tx(q, new.id)
                run = await q.insert_pipeline_run(new)
                if run is None:
                    raise _Refused
                await write_stage(
                    tx, db.schema, cfg, run, 0, nr.items, actor=actor, limit_keys=nr.limit_keys
                )
        except _Refused:
            run = None
        if run is not None:
            fresh = await q0.get_pipeline_run(run.id, tenant=None)
            return fresh or run, True
        if nr.idempotency_key is not None:
            found = await q0.find_idempotent_run(tenant=tenant, idempotency_key=nr.idempotency_key)
            if found is not None:
                if found[1] != digest:
                    raise RunIdempotencyConflict(found[0])
                earlier = await q0.get_pipeline_run(found[0], tenant=tenant)
                if earlier is not None:
                    return earlier, False
        if nr.exclusive_key is not None:
            holder = await q0.find_exclusive_run(tenant=tenant, exclusive_key=nr.exclusive_key)
            if holder is not None:
                raise RunKeyBusy(nr.exclusive_key, holder)
        # The run that refused it ended (or was deleted) in between: try again.
    raise RuntimeError(f"pipeline run refused {KEY_ROUNDS} times by a run gone when looked up")


def stage_status(run: store.RunRow, row: store.StageRow | None) -> str:
    """A stage as its run shows it: its batch's status; 'pending' before it
    starts; 'skipped' when it never will (its items were none, or the run ended
    first); 'deleted' when its batch was deleted."""
    if row is None:
        return "pending" if run.status == states.RunStatus.RUNNING else "skipped"
    if row.batch_id is None:
        return "skipped"
    return row.batch_status or "deleted"


def run_json(run: store.RunRow, rows: Sequence[store.StageRow]) -> dict[str, Any]:
    by_stage = {r.stage: r for r in rows if r.run_id == run.id}
    specs = specs_of(run)
    stages = []
    for i, spec in enumerate(specs):
        row = by_stage.get(i)
        stages.append(
            {
                "name": spec["name"],
                "handler": spec["handler"],
                "items": spec["items"],
                "batch_id": str(row.batch_id) if row is not None and row.batch_id else None,
                "status": stage_status(run, row),
            }
        )
    return {
        "id": str(run.id),
        "pipeline": run.pipeline,
        "tenant": run.tenant,
        "status": run.status,
        "paused": run.paused,
        "cancel_requested": run.cancel_requested,
        "current_stage": specs[run.current_stage]["name"],
        "on_stage_failure": run.on_stage_failure,
        "stages": stages,
        "metadata": models.loads(run.metadata),
        "idempotency_key": run.idempotency_key,
        "exclusive_key": run.exclusive_key,
        "error": models.loads(run.error),
        "created_by": run.created_by,
        "created_at": models.rfc3339(run.created_at),
        "finished_at": models.rfc3339(run.finished_at),
    }


async def describe(q: store.Queries, run: store.RunRow) -> dict[str, Any]:
    return run_json(run, await q.pipeline_stage_rows([run.id]))


async def describe_all(q: store.Queries, runs: Sequence[store.RunRow]) -> list[dict[str, Any]]:
    rows = await q.pipeline_stage_rows([r.id for r in runs]) if runs else []
    return [run_json(r, rows) for r in runs]


def parse_id(run_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        return None


async def _current_batch(q: store.Queries, run: store.RunRow) -> uuid.UUID | None:
    rows = await q.pipeline_stage_rows([run.id])
    current = [r for r in rows if r.stage == run.current_stage]
    return current[0].batch_id if current else None


async def cancel(
    db: dbm.Database, run_id: uuid.UUID, *, tenant: str | None, actor: str
) -> store.RunRow | None:
    """Ask the run to stop: no later stage is created (the component, under the
    same lock, ends the run cancelled once the current stage's batch has ended),
    and the current stage's batch is cancelled. None: no such run."""
    async with db.transaction("cancel_run") as tx:
        q = store.Queries(tx)
        run = await q.lock_pipeline_run(run_id, tenant=tenant)
        if run is None:
            return None
        if run.status == states.RunStatus.CANCELLED:
            return run
        if run.status != states.RunStatus.RUNNING:
            raise RunConflict(f"pipeline run is already {run.status}")
        await q.set_pipeline_run_flags(run.id, cancel_requested=True)
        bid = await _current_batch(q, run)
        if bid is not None:
            # A conflict says the batch has ended already: the run ends with it.
            await q.cancel_batch(bid, tenant=None, actor=actor)
    return await store.Queries(db).get_pipeline_run(run_id, tenant=tenant)


async def pause(
    db: dbm.Database, run_id: uuid.UUID, *, tenant: str | None, actor: str, paused: bool
) -> store.RunRow | None:
    """Pause (or resume) the current stage's batch; a later stage is created
    paused while the run is. None: no such run."""
    async with db.transaction("pause_run") as tx:
        q = store.Queries(tx)
        run = await q.lock_pipeline_run(run_id, tenant=tenant)
        if run is None:
            return None
        if run.status != states.RunStatus.RUNNING:
            raise RunConflict(f"pipeline run is {run.status}")
        await q.set_pipeline_run_flags(run.id, paused=paused)
        bid = await _current_batch(q, run)
        if bid is not None:
            # A conflict says the batch has ended: the next stage takes the flag.
            await q.pause_batch(bid, tenant=None, actor=actor, pause=paused)
    return await store.Queries(db).get_pipeline_run(run_id, tenant=tenant)


async def retry(
    db: dbm.Database,
    run_id: uuid.UUID,
    *,
    tenant: str | None,
    actor: str,
    include_cancelled: bool,
) -> store.RunRow | None:
    """Retry the failed (and cancelled) items of the current stage's batch, and
    run an ended run again from that stage: its later stages follow as usual.
    A run that failed deriving a stage's items derives them again. None: no such run."""
    async with db.transaction("retry_run") as tx:
        q = store.Queries(tx)
        run = await q.lock_pipeline_run(run_id, tenant=tenant)
        if run is None:
            return None
        if run.status == states.RunStatus.COMPLETED:
            raise RunConflict("pipeline run is completed: nothing to retry")
        bid = await _current_batch(q, run)
        outcome = store.NOT_FOUND
        if bid is not None:  # a stage batch has no exclusive key to take back
            outcome = await q.retry_batch(
                bid, tenant=None, actor=actor, include_cancelled=include_cancelled
            )
        if outcome.kind is not store.ControlKind.OK and run.error is None:
            raise RunConflict(outcome.reason or "the current stage has no batch to retry")
        if run.status != states.RunStatus.RUNNING:
            try:
                await q.reopen_pipeline_run(run.id)
            except store.RunKeyTaken:
                # The transaction is aborted: it rolls back, the batch's retry with it.
                raise RunConflict(
                    f"exclusive key {run.exclusive_key!r} is held by another running pipeline run"
                ) from None
    return await store.Queries(db).get_pipeline_run(run_id, tenant=tenant)
