//! The raw SQL of the PostgreSQL backend, with the proof that its locks
//! cannot deadlock.

// The two write statements below are the only raw SQL queries of this
// backend (besides session commands: the `SET`s of a new connection and the
// migration lock); every other statement is written with diesel's query DSL
// against `schema::postgres`. The DSL cannot express them: they read the batch from
// `unnest` of array binds (one bind per column, so a batch of any size is one
// statement with a fixed text, prepared once) and chain data-modifying CTEs
// (`INSERT ... ON CONFLICT DO NOTHING RETURNING`, `UPDATE ... FROM ...
// RETURNING`, then the `feed_head` update and the feed insert, which number
// the changes after the rows actually written) whose results the final
// SELECT returns. diesel 2.3 has no `WITH`, no set-returning function as a
// FROM source, no `UPDATE ... FROM`, and cannot use an `INSERT`/`UPDATE ...
// RETURNING` as a subquery. tests/raw_statements.rs runs both on a fresh
// database: new rows, a row at its expected revision and two conflicts in
// one batch, with the feed's rows checked.
// The retention purge's two statements (`PURGE_ROWS_SQL`,
// `PURGE_ROWS_WITH_FEED_SQL`, after the writes) are raw SQL for the same
// reasons: `unnest` of (id, revision) pairs, a locking CTE, `DELETE ...
// USING ... RETURNING` feeding the `feed_head` update and the feed insert.

/// The revision-checked writes of a batch, shared by both write statements.
///
/// Lock order: two statements that take row locks in opposite orders can
/// deadlock, and an `UPDATE ... FROM` takes its locks in an order its plan
/// picks (a nested loop over `input` in the batch's order, a hash join that
/// probes with a scan of `durable_state` in the table's physical order), so
/// sorting the batch is not enough. The statement works in phases, each in
/// its order whatever the plan (`COLLATE "C"`: byte order, the order the
/// batch is already sorted in, so the sorts are one pass):
/// 0. In cluster mode, `fence` takes a share lock on the ownership row of
///    each slice the batch writes for, in slice order, and keeps the rows
///    whose node still owns their slice at the epoch they carry, with its
///    lease unexpired by the database's clock (`admitted`). A transfer of a
///    slice updates its row, so it waits for every fenced write in flight
///    and each write after it sees the new epoch: the new owner's restore
///    sees everything the old owner committed. Share locks wait only for a
///    transfer, which holds no other lock.
/// 1. `inserted` inserts the new rows in order. It can wait only for another
///    transaction's uncommitted insert or update of the same id.
/// 2. `locked` locks the rows to update: `FOR UPDATE` with `ORDER BY` puts
///    the LockRows node above the Sort, so rows are locked one by one in
///    order, whatever the join below. It first reads `inserted` to the end
///    (the `count(*)`, evaluated below the Sort), so every insert is done
///    before the first lock. A row at another revision is not returned.
/// 3. `updated` updates only rows that `locked` returned, whose locks this
///    transaction already holds, so it waits for nobody (it may update a row
///    before `locked` has locked the next), and only those whose timer
///    `fired_timer` found still due, if they commit a timer's fire. It finds each by the `ctid` of
///    the version `locked` locked, a TID scan instead of a second index
///    lookup: a locked, live row version keeps its `ctid` until this
///    transaction ends. With the feed, `head` takes the
///    `feed_head` lock after all of this, and its holder waits for nobody.
///
/// 2b. `fired_timer` locks the timer row of each locked row that commits a
///    fire, if it is still at the due time fired for: a cancel or another
///    fire of it either committed first (the row is gone or moved and this
///    write commits nothing), or waits for this one. Every statement that
///    locks a timer row (this one, the timer changes after `written`, the
///    purge's deletes) holds its entity's row lock first, but a cancel
///    (`Timers::cancel_timer`), which locks that one row and waits for
///    nothing else: no wait for a timer row closes a cycle.
///
/// No cycle of waits is possible. Place a waiting statement at (phase, id):
/// one waiting in phase 1 at `k` waits for a transaction that inserted `k`
/// (so it is in phase 1 past `k`, or later) or updated it (phase 2 or
/// later); one waiting in phase 2 at `k` waits for a holder of `k`'s row
/// lock (in phase 2 past `k`, or later; an uncommitted insert is invisible to
/// `locked`, which never waits for it). Every wait is for a statement
/// strictly further along, so waits cannot go round in a circle. Each write
/// statement is its own transaction, and no other statement of this backend
/// locks rows of `durable_state` but the purge ([`purge_ctes`]), which takes
/// its locks as phase 2 does and `feed_head`'s after them.
/// tests/deadlock.rs runs two stores whose plans took the old statement's
/// locks in opposite orders.
macro_rules! write_ctes {
    () => {
        "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[], $6::text[], $7::integer[],
                         $8::bigint[], $9::integer[], $10::bigint[], $14::text[], $15::timestamptz[],
                         $16::timestamptz[], $25::boolean[])
        AS t(persistence_id, expected, revision, payload, entity_type, manifest, schema_version, generation, slice,
             fence_epoch, fire_name, fire_due, fire_next, fire_consume)
), fence AS MATERIALIZED (
    SELECT s.slice, s.epoch
    FROM cluster_slices AS s JOIN cluster_nodes AS n ON n.node_id = s.owner
    WHERE s.slice IN (SELECT slice FROM input WHERE fence_epoch IS NOT NULL)
      AND s.owner = $13 AND n.lease_expires > now()
    ORDER BY s.slice
    FOR SHARE OF s
), checked AS (
    SELECT i.*,
           (i.fence_epoch IS NULL
            OR EXISTS (SELECT 1 FROM fence AS f WHERE f.slice = i.slice AND f.epoch = i.fence_epoch)) AS fenced_in
    FROM input AS i
), admitted AS (
    SELECT * FROM checked WHERE fenced_in
), inserted AS (
    INSERT INTO durable_state
        (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload,
         state_schema_version, generation, slice)
    SELECT persistence_id, entity_type, revision, now(), $11, manifest, payload, schema_version, generation, slice
    FROM admitted WHERE expected = 0 AND fire_name IS NULL
    ORDER BY persistence_id COLLATE \"C\"
    ON CONFLICT (persistence_id) DO NOTHING
    RETURNING persistence_id
), locked AS (
    SELECT d.ctid AS row_id, i.persistence_id, i.expected, i.revision, i.payload, i.manifest, i.schema_version,
           i.slice, i.fire_name, i.fire_due
    FROM admitted AS i JOIN durable_state AS d ON d.persistence_id = i.persistence_id AND d.revision = i.expected
        AND (i.generation IS NULL OR d.generation = i.generation)
    WHERE i.expected <> 0 AND (SELECT count(*) FROM inserted) >= 0
    ORDER BY d.persistence_id COLLATE \"C\"
    FOR UPDATE OF d
), fired_timer AS MATERIALIZED (
    SELECT t.persistence_id
    FROM locked AS l JOIN entity_timers AS t
      ON t.persistence_id = l.persistence_id AND t.name = l.fire_name AND t.due = l.fire_due
    ORDER BY t.persistence_id COLLATE \"C\"
    FOR UPDATE OF t
), updated AS (
    UPDATE durable_state AS d
    SET revision = l.revision, db_timestamp = now(), state_ser_id = $11, state_ser_manifest = l.manifest,
        state_payload = l.payload, state_schema_version = l.schema_version, slice = l.slice
    FROM locked AS l
    WHERE d.ctid = l.row_id AND d.revision = l.expected
      AND (l.fire_name IS NULL OR l.persistence_id IN (SELECT persistence_id FROM fired_timer))
    RETURNING d.persistence_id
), written AS (
    SELECT persistence_id FROM inserted UNION ALL SELECT persistence_id FROM updated
), redacted AS (
    UPDATE state_changes AS s SET state_payload = ''::bytea
    WHERE s.persistence_id = ANY($12::text[]) AND s.persistence_id IN (SELECT persistence_id FROM written)
), timers_set AS (
    INSERT INTO entity_timers AS t (persistence_id, name, entity_type, slice, due, schedule, command, missed)
    SELECT n.persistence_id, n.name, i.entity_type, i.slice, n.due, n.schedule, n.command, n.missed
    FROM unnest($17::text[], $18::text[], $19::timestamptz[], $20::text[], $21::bytea[], $22::integer[])
        AS n(persistence_id, name, due, schedule, command, missed)
    JOIN input AS i ON i.persistence_id = n.persistence_id
    WHERE n.persistence_id IN (SELECT persistence_id FROM written)
    ON CONFLICT (persistence_id, name) DO UPDATE
    SET due = EXCLUDED.due, schedule = EXCLUDED.schedule, command = EXCLUDED.command, missed = EXCLUDED.missed
), timers_cancelled AS (
    DELETE FROM entity_timers AS t
    USING unnest($23::text[], $24::text[]) AS c(persistence_id, name)
    WHERE t.persistence_id = c.persistence_id AND t.name = c.name
      AND c.persistence_id IN (SELECT persistence_id FROM written)
), timers_erased AS (
    DELETE FROM entity_timers AS t
    WHERE t.persistence_id = ANY($12::text[]) AND t.persistence_id IN (SELECT persistence_id FROM written)
), timers_fired AS (
    DELETE FROM entity_timers AS t
    USING input AS i
    WHERE i.fire_consume AND i.fire_next IS NULL
      AND t.persistence_id = i.persistence_id AND t.name = i.fire_name AND t.due = i.fire_due
      AND i.persistence_id IN (SELECT persistence_id FROM written)
), timers_advanced AS (
    UPDATE entity_timers AS t SET due = i.fire_next
    FROM input AS i
    WHERE i.fire_consume AND i.fire_next IS NOT NULL
      AND t.persistence_id = i.persistence_id AND t.name = i.fire_name AND t.due = i.fire_due
      AND i.persistence_id IN (SELECT persistence_id FROM written)
)"
    };
}

/// The end of both write statements, `(persistence_id, outcome)`: each row
/// written (`w`), refused by its fence (`f`: its node no longer owns its
/// slice at the epoch it carried, or the node's lease has expired), or a
/// timer's fire whose timer is no longer at the due time it fired for (`g`:
/// fired already, moved or cancelled); the other rows conflicted.
macro_rules! write_outcomes {
    () => {
        "
SELECT persistence_id, 'w' AS outcome FROM written
UNION ALL
SELECT persistence_id, 'f' FROM checked WHERE NOT fenced_in
UNION ALL
SELECT persistence_id, 'g' FROM locked
WHERE fire_name IS NOT NULL AND persistence_id NOT IN (SELECT persistence_id FROM fired_timer)
UNION ALL
SELECT persistence_id, 'g' FROM admitted WHERE fire_name IS NOT NULL AND expected = 0"
    };
}

/// Raw SQL (see above): the batched, revision-checked write without the
/// feed, with its timers (binds 14 to 16 and 25: the timer each row fires,
/// if it does, its due time, its next, and whether the write consumes it;
/// 17 to 22: the timers set; 23 and 24: those cancelled; all for rows
/// written only, after their row's lock, as the feed's rows are). A write that deletes its entity (bind 12: the ids of those) still
/// redacts the entity's earlier feed rows, written by nodes that keep the
/// feed: an erasure erases wherever the data is.
pub(super) const WRITE_ROWS_SQL: &str = concat!(write_ctes!(), write_outcomes!());

/// Raw SQL (see above): the same write, plus one change feed row per committed revision
/// (binds 26 to 29: persistence ids, entity types, revisions, payloads; each
/// change has its row's schema version). A write that deletes its entity
/// (bind 12: the ids of those) redacts the entity's earlier feed rows to the
/// empty payload, in the same statement: the `UPDATE` sees the rows as they
/// were before it, so not the ones `feed` inserts. Only the writer holding
/// an entity's row lock (from `locked` or `inserted`) touches its feed rows,
/// so these row locks add no wait that could close a circle.
/// Positions come from `feed_head`, whose row lock is held until commit: feed
/// writers commit one after another, so positions appear gapless and in
/// commit order, and a rolled-back statement rolls its positions back.
pub(super) const WRITE_ROWS_WITH_FEED_SQL: &str = concat!(
    write_ctes!(),
    ", changes AS (
    SELECT c.persistence_id, c.entity_type, c.revision, c.payload, i.schema_version, c.ord
    FROM unnest($26::text[], $27::text[], $28::bigint[], $29::bytea[])
        WITH ORDINALITY AS c(persistence_id, entity_type, revision, payload, ord)
    JOIN input AS i ON i.persistence_id = c.persistence_id
    WHERE c.persistence_id IN (SELECT persistence_id FROM written)
), head AS (
    UPDATE feed_head SET position = position + (SELECT count(*) FROM changes) WHERE id = 1
    RETURNING position - (SELECT count(*) FROM changes) AS base
), feed AS (
    INSERT INTO state_changes
        (position, entity_type, persistence_id, revision, committed_at, state_payload, state_schema_version)
    SELECT head.base + row_number() OVER (ORDER BY changes.ord), changes.entity_type, changes.persistence_id,
           changes.revision, now(), changes.payload, changes.schema_version
    FROM changes CROSS JOIN head
)",
    write_outcomes!()
);

/// The retention purge's deletes, shared by both purge statements (raw SQL:
/// see above). Binds: `$1` persistence ids (unique), `$2` the revision each
/// was found at, `$3` the cutoff; in cluster mode `$4` their slices, `$5`
/// the epochs their node owns them at and `$6` the node, fenced as writes
/// are (a node that lost a slice purges nothing of it). A row is deleted only if it still has that
/// revision and was still last written before the cutoff, so a row written
/// meanwhile by any node is kept.
///
/// `locked` locks the rows one by one in persistence id order, the order of
/// a write's phase 2 (see [`write_ctes`]), so a purge and writes never wait
/// for each other in a circle; `MATERIALIZED` keeps the locking step, and its
/// order, a step of its own whatever the planner does. A row a concurrent
/// write changed is re-checked once its lock is had (READ COMMITTED reads
/// the newest version then) and, at another revision, not returned.
macro_rules! purge_ctes {
    () => {
        "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $4::integer[], $5::bigint[])
        AS t(persistence_id, revision, slice, fence_epoch)
), fence AS MATERIALIZED (
    SELECT s.slice, s.epoch
    FROM cluster_slices AS s JOIN cluster_nodes AS n ON n.node_id = s.owner
    WHERE s.slice IN (SELECT slice FROM input WHERE fence_epoch IS NOT NULL)
      AND s.owner = $6 AND n.lease_expires > now()
    ORDER BY s.slice
    FOR SHARE OF s
), admitted AS (
    SELECT * FROM input AS i
    WHERE i.fence_epoch IS NULL
       OR EXISTS (SELECT 1 FROM fence AS f WHERE f.slice = i.slice AND f.epoch = i.fence_epoch)
), locked AS MATERIALIZED (
    SELECT d.persistence_id, d.revision
    FROM admitted AS i JOIN durable_state AS d ON d.persistence_id = i.persistence_id AND d.revision = i.revision
    WHERE d.db_timestamp < $3
    ORDER BY d.persistence_id COLLATE \"C\"
    FOR UPDATE OF d
), purged AS (
    DELETE FROM durable_state AS d USING locked AS l
    WHERE d.persistence_id = l.persistence_id AND d.revision = l.revision AND d.db_timestamp < $3
    RETURNING d.persistence_id, d.entity_type, d.revision
)"
    };
}

/// Raw SQL (see above): the retention purge without the feed; the purged
/// entities' earlier feed rows (written by nodes that keep the feed) are
/// redacted all the same.
pub(super) const PURGE_ROWS_SQL: &str = concat!(
    purge_ctes!(),
    ", redacted AS (
    UPDATE state_changes AS s SET state_payload = ''::bytea
    WHERE s.persistence_id IN (SELECT persistence_id FROM purged)
), timers AS (
    DELETE FROM entity_timers AS t WHERE t.persistence_id IN (SELECT persistence_id FROM purged)
)
SELECT persistence_id FROM purged"
);

/// Raw SQL (see above): the purge, plus one feed row per purged entity: the
/// next revision, with the tombstone payload `$7`, so a consumer sees the
/// entity deleted; its earlier feed rows are redacted to the empty payload
/// in the same statement. Positions come from `feed_head`, as for writes:
/// gapless and in commit order.
pub(super) const PURGE_ROWS_WITH_FEED_SQL: &str = concat!(
    purge_ctes!(),
    ", head AS (
    UPDATE feed_head SET position = position + (SELECT count(*) FROM purged) WHERE id = 1
    RETURNING position - (SELECT count(*) FROM purged) AS base
), feed AS (
    INSERT INTO state_changes (position, entity_type, persistence_id, revision, committed_at, state_payload)
    SELECT head.base + row_number() OVER (ORDER BY purged.persistence_id COLLATE \"C\"), purged.entity_type,
           purged.persistence_id, purged.revision + 1, now(), $7
    FROM purged CROSS JOIN head
), redacted AS (
    UPDATE state_changes AS s SET state_payload = ''::bytea
    WHERE s.persistence_id IN (SELECT persistence_id FROM purged)
), timers AS (
    DELETE FROM entity_timers AS t WHERE t.persistence_id IN (SELECT persistence_id FROM purged)
)
SELECT persistence_id FROM purged"
);
