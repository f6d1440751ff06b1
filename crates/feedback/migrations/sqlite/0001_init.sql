-- Timestamps are unix milliseconds (INTEGER) so the same code reads them on both backends.
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    role TEXT NOT NULL CHECK (role IN ('admin', 'annotator')),
    created_at INTEGER NOT NULL
);
CREATE TABLE invites (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_by INTEGER REFERENCES users(id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    task_kind TEXT NOT NULL,
    criteria TEXT NOT NULL,
    likert_max INTEGER NOT NULL,
    overlap INTEGER NOT NULL,
    min_seconds REAL NOT NULL,
    guidelines TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE project_members (
    project_id INTEGER NOT NULL REFERENCES projects(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    PRIMARY KEY (project_id, user_id)
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    external_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,
    gold TEXT,
    uncertainty REAL,
    label_count INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    UNIQUE (project_id, external_id)
);
-- Queue walks: least-labelled first, most uncertain first, gold items.
CREATE INDEX items_queue ON items (project_id, label_count, id);
CREATE INDEX items_scored ON items (project_id, uncertainty);
CREATE INDEX items_gold ON items (project_id, id) WHERE gold IS NOT NULL;
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    shown_order TEXT NOT NULL,
    served_at INTEGER NOT NULL
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    assignment_id INTEGER REFERENCES assignments(id),
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    supersedes INTEGER REFERENCES labels(id),
    idempotency_key TEXT NOT NULL,
    duration_ms INTEGER,
    created_at INTEGER NOT NULL,
    UNIQUE (user_id, idempotency_key),
    UNIQUE (supersedes)
);
-- One chain per (item, annotator): only the first label has no predecessor.
CREATE UNIQUE INDEX labels_chain_root ON labels (item_id, user_id) WHERE supersedes IS NULL;
CREATE INDEX labels_item_user ON labels (item_id, user_id);
CREATE INDEX labels_project_user ON labels (project_id, user_id);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    user_id INTEGER,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
