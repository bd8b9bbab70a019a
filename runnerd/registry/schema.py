"""The registry's schema: one migration per version, applied in order (`PRAGMA user_version`
counts those applied). A migration that has shipped is never edited: the frozen registries
under tests/data/ are upgraded by today's code."""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        variation TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        params TEXT NOT NULL,
        tags TEXT NOT NULL,
        cwd TEXT,
        run_dir TEXT,
        host TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        last_heartbeat_at REAL,
        lost_at REAL,
        heartbeat_seq INTEGER NOT NULL DEFAULT 0,
        heartbeats INTEGER NOT NULL DEFAULT 0,
        heartbeat_timeout REAL,
        lost_grace REAL,
        deadline REAL,
        retry_of TEXT,
        launch TEXT,
        UNIQUE (experiment, variation, attempt)
    ) WITHOUT ROWID;
    CREATE INDEX runs_by_state ON runs (state, created_at);
    CREATE INDEX runs_by_created ON runs (created_at);
    CREATE INDEX runs_by_dir ON runs (run_dir);
    CREATE TABLE transitions (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        cause TEXT NOT NULL,
        source TEXT NOT NULL
    );
    CREATE INDEX transitions_by_run ON transitions (run_id, seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        experiment TEXT,
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_by_run ON events (run_id, seq);
    CREATE INDEX events_by_experiment ON events (experiment, seq);
    CREATE TABLE failures (
        run_id TEXT PRIMARY KEY,
        failure_class TEXT NOT NULL,
        message TEXT NOT NULL,
        traceback TEXT,
        phase TEXT,
        reason TEXT NOT NULL,
        signature TEXT NOT NULL,
        category TEXT,
        retryable INTEGER,
        exit_code INTEGER,
        signal TEXT,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX failures_by_time ON failures (at);
    CREATE INDEX failures_by_signature ON failures (signature, at);
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        data TEXT NOT NULL,
        path TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX checkpoints_by_run ON checkpoints (run_id, seq);
    CREATE TABLE run_pids (
        run_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_time INTEGER,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, pid)
    ) WITHOUT ROWID;
    CREATE TABLE crash_files (
        run_id TEXT NOT NULL,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE resources (
        run_id TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE watched_dirs (
        path TEXT PRIMARY KEY,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        op TEXT NOT NULL,
        run_id TEXT NOT NULL,
        reply TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: prune deletes a run's idempotency keys; without this, one full scan per run (BUG-5).
    "CREATE INDEX idempotency_by_run ON idempotency (run_id)",
    # 3: sweeps and their cells; runs linked to a cell, or to the attempt they resume.
    """
    ALTER TABLE runs ADD COLUMN sweep_id TEXT;
    ALTER TABLE runs ADD COLUMN cell INTEGER;
    ALTER TABLE runs ADD COLUMN resumed_from TEXT;
    CREATE INDEX runs_by_sweep ON runs (sweep_id, created_at) WHERE sweep_id IS NOT NULL;
    ALTER TABLE events ADD COLUMN sweep_id TEXT;
    CREATE INDEX events_by_sweep ON events (sweep_id, seq) WHERE sweep_id IS NOT NULL;
    CREATE TABLE sweeps (
        sweep_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        failure_policy TEXT NOT NULL,
        spec TEXT NOT NULL,
        folder TEXT NOT NULL,
        status TEXT NOT NULL,
        driver_pid INTEGER,
        driver_start INTEGER,
        created_at REAL NOT NULL,
        ended_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE sweep_cells (
        sweep_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        params TEXT NOT NULL,
        variation TEXT NOT NULL,
        latest_run_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sweep_id, idx)
    ) WITHOUT ROWID;
    """,
    # 4: what an outside witness (Dask's scheduler) says killed a run.
    """
    CREATE TABLE run_labels (
        run_id TEXT PRIMARY KEY,
        category TEXT NOT NULL,
        note TEXT,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: the boot each process was attached in (another boot id at start-up means the machine
    # went down), and the digest of each keyed event (a key reused for another event conflicts).
    """
    ALTER TABLE run_pids ADD COLUMN boot_id TEXT;
    ALTER TABLE idempotency ADD COLUMN digest TEXT;
    """,
    # 6: heartbeat seqs a later seq skipped, counted if they arrive late (not replays).
    """
    CREATE TABLE heartbeat_gaps (
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    """,
    # 7: the task an attempt runs, in its scheduler's terms: the same task dispatched again
    # may take its cell over. Dask cells' attempts kept it in their tags (dask_key) until now.
    """
    ALTER TABLE runs ADD COLUMN claim_token TEXT;
    UPDATE runs SET claim_token = json_extract(tags, '$.dask_key')
        WHERE sweep_id IS NOT NULL AND json_valid(tags)
        AND json_type(tags, '$.dask_key') = 'text';
    """,
    # 8: a run's own stall_timeout (NULL: the daemon's), set when it starts.
    "ALTER TABLE runs ADD COLUMN stall_timeout REAL",
    # 9: the environment a launched run's command ran with (JSON), for its reruns; never
    # part of a run object (not in RUN_COLUMNS).
    "ALTER TABLE runs ADD COLUMN launch_env TEXT",
    # 10: event seqs are never reused: consumers keep a cursor on them (follow --since,
    # subscribe, hooks), and pruning the newest events let new ones take their numbers.
    """
    CREATE TABLE events_kept (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        experiment TEXT,
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL,
        sweep_id TEXT
    );
    INSERT INTO events_kept (seq, run_id, experiment, kind, at, data, sweep_id)
        SELECT seq, run_id, experiment, kind, at, data, sweep_id FROM events;
    DROP TABLE events;
    ALTER TABLE events_kept RENAME TO events;
    CREATE INDEX events_by_run ON events (run_id, seq);
    CREATE INDEX events_by_experiment ON events (experiment, seq);
    CREATE INDEX events_by_sweep ON events (sweep_id, seq) WHERE sweep_id IS NOT NULL;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

RUN_COLUMNS = (
    "run_id",
    "experiment",
    "variation",
    "attempt",
    "state",
    "params",
    "tags",
    "cwd",
    "run_dir",
    "host",
    "created_at",
    "started_at",
    "ended_at",
    "last_heartbeat_at",
    "lost_at",
    "heartbeat_seq",
    "heartbeats",
    "heartbeat_timeout",
    "lost_grace",
    "deadline",
    "retry_of",
    "launch",
    "sweep_id",
    "cell",
    "resumed_from",
    "claim_token",
)
SWEEP_COLUMNS = (
    "sweep_id",
    "experiment",
    "failure_policy",
    "spec",
    "folder",
    "status",
    "driver_pid",
    "driver_start",
    "created_at",
    "ended_at",
)
FAILURE_COLUMNS = (
    "failure_class",
    "message",
    "traceback",
    "phase",
    "reason",
    "signature",
    "category",
    "retryable",
    "exit_code",
    "signal",
    "at",
)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema up to SCHEMA_VERSION, one transaction per migration; a registry made
    by a newer runnerd is refused."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this runnerd knows ({SCHEMA_VERSION})"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
        log.info("registry migrated to schema version %d", number)
