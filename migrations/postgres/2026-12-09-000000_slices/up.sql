-- Each row's slice, 0..1023: Pekko's abs(persistence_id.hashCode() % 1024),
-- written by every write (rows from before are filled in by the store at
-- start, in chunks): an owner reads, purges and follows its slices by it.
ALTER TABLE durable_state ADD COLUMN slice INTEGER;

-- Cluster mode: ownership of the slices, decided in this database. Each
-- node renews one row, its own, whatever it owns; every expiry is decided
-- by the database's clock.
CREATE TABLE IF NOT EXISTS cluster_nodes (
    node_id       TEXT        NOT NULL PRIMARY KEY,
    -- Where other nodes forward the commands of the slices it owns.
    address       TEXT        NOT NULL,
    lease_expires TIMESTAMPTZ NOT NULL,
    joined_at     TIMESTAMPTZ NOT NULL,
    -- It is leaving gracefully: others take its slices as it hands them over.
    leaving       BOOLEAN     NOT NULL DEFAULT false
);

-- One row per slice. A slice changes hands only by compare-and-set on its
-- row; `epoch` counts its transfers and is the fencing token every write
-- for the slice carries and checks (holding the row FOR SHARE, so that no
-- transfer commits while a write of the previous owner is in flight).
CREATE TABLE IF NOT EXISTS cluster_slices (
    slice INTEGER NOT NULL PRIMARY KEY CHECK (slice >= 0 AND slice < 1024),
    owner TEXT,
    epoch BIGINT  NOT NULL DEFAULT 0
);
INSERT INTO cluster_slices (slice) SELECT generate_series(0, 1023) ON CONFLICT (slice) DO NOTHING;

-- Named leases for work that runs once per cluster (a feed consumer, a
-- publisher, a sweep): held by a node, valid while its node's lease is;
-- `epoch` counts the hand-overs and fences the holder's position saves.
CREATE TABLE IF NOT EXISTS cluster_leases (
    name   TEXT   NOT NULL PRIMARY KEY,
    holder TEXT,
    epoch  BIGINT NOT NULL DEFAULT 0
);
