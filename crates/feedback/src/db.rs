//! One database layer for SQLite (embedded default) and PostgreSQL (teams), through
//! sqlx's `Any` driver. All SQL is written once in the common dialect: `$n` placeholders
//! (SQLite accepts them as numbered parameters), `RETURNING`, `ON CONFLICT`, and only
//! BIGINT / DOUBLE / TEXT columns. Only the DDL differs, so there are two migration sets.

use anyhow::{bail, Context, Result};
use futures_core::future::BoxFuture;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyConnection;
use sqlx::{AnyPool, Executor, Row};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Migrations, in order: (version, name, sqlite DDL, postgres DDL).
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "leases",
        include_str!("../migrations/sqlite/0002_leases.sql"),
        include_str!("../migrations/postgres/0002_leases.sql"),
    ),
];

/// Whether opening a SQLite path may create the file. Commands that only read or that
/// add to existing projects open an existing database: a typo in `--db` must not
/// silently produce (and then report on) a new empty database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    CreateIfMissing,
    MustExist,
}

pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// SQLite allows one writer; a deferred transaction that reads and then writes fails
    /// with SQLITE_BUSY instead of waiting when another writer got in first. Serialising
    /// write transactions in-process avoids that (the server owns the file). Postgres
    /// handles concurrent writers itself, so no lock there.
    write_lock: Option<Mutex<()>>,
}

fn is_server_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Turns `--db` into a sqlx URL: postgres URLs pass through, anything else is a SQLite
/// file path (created if missing with `Open::CreateIfMissing`).
pub fn database_url(db: &str, open: Open) -> String {
    if is_server_url(db) || db.starts_with("sqlite:") {
        db.to_string()
    } else {
        let mode = if open == Open::CreateIfMissing {
            "rwc"
        } else {
            "rw"
        };
        format!("sqlite://{db}?mode={mode}")
    }
}

impl Db {
    /// Opens (creating if missing) and migrates a database: for the server and for
    /// commands that set one up.
    pub async fn connect(db: &str) -> Result<Db> {
        Db::open(db, Open::CreateIfMissing).await
    }

    pub async fn open(db: &str, open: Open) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let url = database_url(db, open);
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        if backend == Backend::Sqlite {
            check_sqlite_file(db, open).await?;
        }
        let mut opts =
            AnyPoolOptions::new().max_connections(if backend == Backend::Sqlite { 4 } else { 16 });
        if backend == Backend::Sqlite {
            opts = opts.after_connect(|conn, _meta| sqlite_pragmas(conn));
        }
        let pool = opts
            .connect(&url)
            .await
            .with_context(|| format!("cannot open database {}", redact(db)))?;
        let db = Db {
            pool,
            backend,
            write_lock: (backend == Backend::Sqlite).then(|| Mutex::new(())),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Hold this across a write transaction (no-op on Postgres).
    pub async fn write_guard(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(m) => Some(m.lock().await),
            None => None,
        }
    }

    async fn migrate(&self) -> Result<()> {
        let _g = self.write_guard().await;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .context("creating schema_migrations")?;
        let applied: Vec<i64> =
            sqlx::query("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.get::<i64, _>(0))
                .collect();
        if let Some(&max) = applied.last() {
            if max > MIGRATIONS.last().map(|m| m.0).unwrap_or(0) {
                bail!("database schema version {max} is newer than this build understands");
            }
        }
        for &(version, name, sqlite, postgres) in MIGRATIONS {
            if applied.contains(&version) {
                continue;
            }
            let ddl = match self.backend {
                Backend::Sqlite => sqlite,
                Backend::Postgres => postgres,
            };
            let mut tx = self.pool.begin().await?;
            sqlx::raw_sql(ddl)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("applying migration {version} ({name})"))?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(version)
            .bind(name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Opens one connection up front and reads the schema, so a missing or corrupt file
/// fails at once with its name and the cause. (Through the pool, a connection whose
/// set-up fails is retried until the 30 s acquire timeout, which then reports only
/// "pool timed out".)
async fn check_sqlite_file(db: &str, open: Open) -> Result<()> {
    use sqlx::Connection;
    let path = db
        .strip_prefix("sqlite://")
        .or_else(|| db.strip_prefix("sqlite:"))
        .unwrap_or(db);
    let path = path.split('?').next().unwrap_or(path);
    let p = std::path::Path::new(path);
    if open == Open::MustExist && !p.exists() {
        bail!("no database at {path}: this command does not create one (check --db, or create the project first with `create-project`)");
    }
    if p.is_dir() {
        bail!("cannot open database {path}: it is a directory, not a SQLite file");
    }
    if !p.exists() {
        return Ok(());
    }
    let mut conn = AnyConnection::connect(&database_url(db, Open::MustExist))
        .await
        .with_context(|| format!("cannot open database {path}"))?;
    let check = sqlx::query("SELECT COUNT(*) FROM sqlite_master")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    check.with_context(|| format!("cannot open database {path}: not a readable SQLite database (corrupt, or another kind of file?)"))?;
    Ok(())
}

/// WAL: readers don't block the writer; NORMAL sync keeps every committed transaction
/// across a process crash (kill -9), only an OS crash could lose the last commits.
fn sqlite_pragmas(conn: &mut AnyConnection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;")
            .await?;
        Ok(())
    })
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hides the password in a postgres URL for error messages.
pub fn redact(db: &str) -> String {
    match (db.find("://"), db.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &db[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &db[..s + 3], &creds[..c], &db[at..]),
                None => db.to_string(),
            }
        }
        _ => db.to_string(),
    }
}

/// Reads an optional i64 column that is NULL on absence.
pub fn opt_i64(row: &AnyRow, col: &str) -> Option<i64> {
    row.try_get::<Option<i64>, _>(col).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            database_url("fb.sqlite", Open::CreateIfMissing),
            "sqlite://fb.sqlite?mode=rwc"
        );
        assert_eq!(
            database_url("fb.sqlite", Open::MustExist),
            "sqlite://fb.sqlite?mode=rw"
        );
        assert_eq!(
            database_url("postgres://u:p@h/db", Open::MustExist),
            "postgres://u:p@h/db"
        );
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("fb.sqlite"), "fb.sqlite");
    }
}
