//! All SQL lives here. Labels are append-only: a changed mind or an undo is a new row
//! whose `supersedes` points at the previous head of that (item, annotator) chain; the
//! unique constraints on `supersedes` and on chain roots keep each chain linear even
//! under concurrent submissions. `items.label_count` caches how many annotators
//! currently have a live label on the item (kept in the same transaction) so queue
//! selection stays one indexed query.

use rand::Rng;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::db::{now_ms, opt_i64, Backend, Db};
use crate::error::{invalid, Error, Result};
use crate::model::*;

/// A random URL-safe token (192 bits).
pub fn random_token() -> String {
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokens are stored hashed so a leaked database does not leak live sessions/invites.
pub fn token_hash(token: &str) -> String {
    use blake2::{Blake2s256, Digest};
    Blake2s256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub async fn audit_tx(
    tx: &mut Transaction<'_, Any>,
    user_id: Option<i64>,
    action: &str,
    detail: Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, user_id, action, detail) VALUES ($1, NULLIF($2, 0), $3, $4)",
    )
    .bind(now_ms())
    .bind(user_id.unwrap_or(0))
    .bind(action)
    .bind(detail.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks a user's unused invites as used (revoked); returns how many.
async fn revoke_invites(tx: &mut Transaction<'_, Any>, user_id: i64, now: i64) -> Result<u64> {
    Ok(
        sqlx::query("UPDATE invites SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
            .bind(now)
            .bind(user_id)
            .execute(&mut **tx)
            .await?
            .rows_affected(),
    )
}

/// Deletes a user's sessions except `keep` (a raw session token); returns how many.
async fn end_sessions(
    tx: &mut Transaction<'_, Any>,
    user_id: i64,
    keep: Option<&str>,
) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND token_hash <> $2")
            .bind(user_id)
            .bind(keep.map(token_hash).unwrap_or_default())
            .execute(&mut **tx)
            .await?
            .rows_affected(),
    )
}

fn user_from_row(r: &AnyRow) -> Result<User> {
    Ok(User {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        role: Role::parse(&r.try_get::<String, _>("role")?)?,
        has_password: r.try_get::<Option<String>, _>("password_hash")?.is_some(),
    })
}

fn project_from_row(r: &AnyRow) -> Result<Project> {
    Ok(Project {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        kind: TaskKind::parse(&r.try_get::<String, _>("task_kind")?)?,
        criteria: serde_json::from_str(&r.try_get::<String, _>("criteria")?)?,
        likert_max: r.try_get("likert_max")?,
        overlap: r.try_get("overlap")?,
        min_seconds: r.try_get("min_seconds")?,
        guidelines: r.try_get("guidelines")?,
        created_at: r.try_get("created_at")?,
    })
}

fn item_from_row(r: &AnyRow) -> Result<Item> {
    let gold: Option<String> = r.try_get("gold")?;
    Ok(Item {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        external_id: r.try_get("external_id")?,
        prompt: r.try_get("prompt")?,
        responses: serde_json::from_str(&r.try_get::<String, _>("responses")?)?,
        gold: gold.map(|g| serde_json::from_str(&g)).transpose()?,
        uncertainty: r.try_get::<Option<f64>, _>("uncertainty")?,
        label_count: r.try_get("label_count")?,
    })
}

fn label_from_row(r: &AnyRow) -> Result<Label> {
    Ok(Label {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        item_id: r.try_get("item_id")?,
        user_id: r.try_get("user_id")?,
        assignment_id: opt_i64(r, "assignment_id"),
        value: serde_json::from_str(&r.try_get::<String, _>("value")?)?,
        supersedes: opt_i64(r, "supersedes"),
        duration_ms: opt_i64(r, "duration_ms"),
        created_at: r.try_get("created_at")?,
    })
}

const ITEM_COLS: &str =
    "id, project_id, external_id, prompt, responses, gold, uncertainty, label_count";
const LABEL_COLS: &str =
    "id, project_id, item_id, user_id, assignment_id, value, supersedes, duration_ms, created_at";

/// Live labels: heads of their chain that are not undos.
const LIVE: &str =
    "NOT EXISTS (SELECT 1 FROM labels s WHERE s.supersedes = l.id) AND l.kind <> 'undo'";

pub enum Submitted {
    New(i64),
    /// The idempotency key was already used: the original label id.
    Duplicate(i64),
}

impl Submitted {
    pub fn id(&self) -> i64 {
        match self {
            Submitted::New(i) | Submitted::Duplicate(i) => *i,
        }
    }
}

impl Db {
    // ---------------------------------------------------------------- users

    pub async fn count_users(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    pub async fn create_user(
        &self,
        actor: Option<i64>,
        username: &str,
        role: Role,
        password_hash: Option<&str>,
    ) -> Result<i64> {
        let username = username.trim();
        if username.is_empty() || username.len() > 64 || username.chars().any(|c| c.is_control()) {
            return Err(invalid("username must be 1–64 printable characters"));
        }
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT id FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(Error::Conflict(format!("user {username:?} already exists")));
        }
        let id: i64 = sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES ($1, NULLIF($2, ''), $3, $4) RETURNING id",
        )
        .bind(username)
        .bind(password_hash.unwrap_or(""))
        .bind(role.as_str())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        audit_tx(
            &mut tx,
            actor,
            "user_create",
            json!({"user_id": id, "username": username, "role": role.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<(User, Option<String>)>> {
        let row =
            sqlx::query("SELECT id, username, role, password_hash FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok((
                user_from_row(&r)?,
                r.try_get::<Option<String>, _>("password_hash")?,
            ))
        })
        .transpose()
    }

    pub async fn user(&self, id: i64) -> Result<User> {
        let r = sqlx::query("SELECT id, username, role, password_hash FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("user {id}")))?;
        user_from_row(&r)
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        sqlx::query("SELECT id, username, role, password_hash FROM users ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(user_from_row)
            .collect()
    }

    pub async fn set_role(&self, actor: i64, user_id: i64, role: Role) -> Result<()> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let old: String = sqlx::query("SELECT role FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("user {user_id}")))?
            .try_get(0)?;
        if old == "admin" && role != Role::Admin {
            let admins: i64 = sqlx::query("SELECT COUNT(*) FROM users WHERE role = 'admin'")
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if admins <= 1 {
                return Err(invalid("cannot demote the last admin"));
            }
        }
        sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        audit_tx(
            &mut tx,
            Some(actor),
            "role_change",
            json!({"user_id": user_id, "from": old, "to": role.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets a new password and ends every session of the user except `keep` (the one
    /// that made the change, if any): a changed password must lock out whoever else
    /// was logged in with the old one.
    pub async fn set_password(&self, user_id: i64, hash: &str, keep: Option<&str>) -> Result<()> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let ended = end_sessions(&mut tx, user_id, keep).await?;
        audit_tx(
            &mut tx,
            Some(user_id),
            "password_set",
            json!({"user_id": user_id, "sessions_ended": ended}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- invites

    /// Single-use invite for an existing user; returns the raw token (shown once). Any
    /// older unused invite of the user stops working: only the newest link is valid.
    pub async fn create_invite(
        &self,
        actor: Option<i64>,
        user_id: i64,
        ttl_ms: i64,
    ) -> Result<String> {
        let token = random_token();
        let now = now_ms();
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let revoked = revoke_invites(&mut tx, user_id, now).await?;
        sqlx::query("INSERT INTO invites (token_hash, user_id, created_by, created_at, expires_at) VALUES ($1, $2, NULLIF($3, 0), $4, $5)")
            .bind(token_hash(&token))
            .bind(user_id)
            .bind(actor.unwrap_or(0))
            .bind(now)
            .bind(now + ttl_ms)
            .execute(&mut *tx)
            .await?;
        audit_tx(&mut tx, actor, "invite", json!({"user_id": user_id, "expires_at": now + ttl_ms, "older_invites_revoked": revoked})).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// The user an unused, unexpired invite is for.
    pub async fn invite_user(&self, token: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash FROM invites i JOIN users u ON u.id = i.user_id \
             WHERE i.token_hash = $1 AND i.used_at IS NULL AND i.expires_at > $2",
        )
        .bind(token_hash(token))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Consumes the invite and sets the password, atomically; None if the invite was
    /// already used, revoked or expired.
    pub async fn redeem_invite(&self, token: &str, password_hash: &str) -> Result<Option<User>> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("UPDATE invites SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING user_id")
            .bind(now_ms())
            .bind(token_hash(token))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user_id: i64 = row.try_get(0)?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        // An invite is also a password reset: other links and every old session end here.
        revoke_invites(&mut tx, user_id, now_ms()).await?;
        let ended = end_sessions(&mut tx, user_id, None).await?;
        audit_tx(
            &mut tx,
            Some(user_id),
            "invite_redeemed",
            json!({"user_id": user_id, "sessions_ended": ended}),
        )
        .await?;
        tx.commit().await?;
        drop(_g);
        Ok(Some(self.user(user_id).await?))
    }

    // ---------------------------------------------------------------- sessions

    /// Returns (session token, csrf token).
    pub async fn create_session(&self, user_id: i64, ttl_ms: i64) -> Result<(String, String)> {
        let (token, csrf) = (random_token(), random_token());
        let now = now_ms();
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(token_hash(&token))
            .bind(user_id)
            .bind(&csrf)
            .bind(now)
            .bind(now + ttl_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        audit_tx(&mut tx, Some(user_id), "login", json!({})).await?;
        tx.commit().await?;
        Ok((token, csrf))
    }

    /// The user and CSRF token of a live session.
    pub async fn session(&self, token: &str) -> Result<Option<(User, String)>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash, s.csrf_token FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(token_hash(token))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((user_from_row(&r)?, r.try_get::<String, _>("csrf_token")?)))
            .transpose()
    }

    pub async fn delete_session(&self, token: &str, user_id: i64) -> Result<()> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash(token))
            .execute(&mut *tx)
            .await?;
        audit_tx(&mut tx, Some(user_id), "logout", json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Test helper and admin tool: moves a session's expiry (e.g. into the past).
    pub async fn set_session_expiry(&self, token: &str, expires_at: i64) -> Result<()> {
        let _g = self.write_guard().await;
        sqlx::query("UPDATE sessions SET expires_at = $1 WHERE token_hash = $2")
            .bind(expires_at)
            .bind(token_hash(token))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- projects

    pub async fn create_project(&self, actor: Option<i64>, p: &NewProject) -> Result<i64> {
        p.validate()?;
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        if sqlx::query("SELECT id FROM projects WHERE name = $1")
            .bind(&p.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(Error::Conflict(format!(
                "project {:?} already exists",
                p.name
            )));
        }
        let id: i64 = sqlx::query(
            "INSERT INTO projects (name, task_kind, criteria, likert_max, overlap, min_seconds, guidelines, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(&p.name)
        .bind(p.kind.as_str())
        .bind(serde_json::to_string(&p.criteria)?)
        .bind(p.likert_max)
        .bind(p.overlap)
        .bind(p.min_seconds)
        .bind(&p.guidelines)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        audit_tx(
            &mut tx,
            actor,
            "project_create",
            json!({"project_id": id, "name": p.name, "kind": p.kind.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn project(&self, id: i64) -> Result<Project> {
        let r = sqlx::query("SELECT * FROM projects WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("project {id}")))?;
        project_from_row(&r)
    }

    pub async fn project_by_name(&self, name: &str) -> Result<Project> {
        let r = sqlx::query("SELECT * FROM projects WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("project {name:?}")))?;
        project_from_row(&r)
    }

    /// Projects visible to a user: all for admins, assigned ones for annotators.
    pub async fn projects_for(&self, user: &User) -> Result<Vec<Project>> {
        let rows = match user.role {
            Role::Admin => sqlx::query("SELECT * FROM projects ORDER BY id").fetch_all(&self.pool).await?,
            Role::Annotator => {
                sqlx::query(
                    "SELECT p.* FROM projects p JOIN project_members m ON m.project_id = p.id WHERE m.user_id = $1 ORDER BY p.id",
                )
                .bind(user.id)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(project_from_row).collect()
    }

    /// The project if the user may see it; Forbidden otherwise (also for unknown ids,
    /// so annotators cannot probe which projects exist).
    pub async fn project_for(&self, user: &User, id: i64) -> Result<Project> {
        if user.role == Role::Admin {
            return self.project(id).await;
        }
        let r = sqlx::query(
            "SELECT p.* FROM projects p JOIN project_members m ON m.project_id = p.id WHERE p.id = $1 AND m.user_id = $2",
        )
        .bind(id)
        .bind(user.id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::Forbidden(format!("you are not assigned to project {id}")))?;
        project_from_row(&r)
    }

    pub async fn update_project_settings(
        &self,
        actor: i64,
        id: i64,
        criteria: &[String],
        likert_max: i64,
        overlap: i64,
        min_seconds: f64,
    ) -> Result<()> {
        let p = self.project(id).await?;
        validate_settings(&p.name, criteria, likert_max, overlap, min_seconds)?;
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE projects SET criteria = $1, likert_max = $2, overlap = $3, min_seconds = $4 WHERE id = $5")
            .bind(serde_json::to_string(criteria)?)
            .bind(likert_max)
            .bind(overlap)
            .bind(min_seconds)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit_tx(
            &mut tx,
            Some(actor),
            "project_settings",
            json!({"project_id": id, "criteria": criteria, "likert_max": likert_max, "overlap": overlap, "min_seconds": min_seconds}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_guidelines(&self, actor: i64, id: i64, text: &str) -> Result<()> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE projects SET guidelines = $1 WHERE id = $2")
            .bind(text)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit_tx(
            &mut tx,
            Some(actor),
            "guidelines_edit",
            json!({"project_id": id, "chars": text.chars().count()}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn members(&self, project_id: i64) -> Result<Vec<User>> {
        sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash FROM users u JOIN project_members m ON m.user_id = u.id \
             WHERE m.project_id = $1 ORDER BY u.id",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(user_from_row)
        .collect()
    }

    pub async fn set_member(
        &self,
        actor: Option<i64>,
        project_id: i64,
        user_id: i64,
        member: bool,
    ) -> Result<()> {
        self.project(project_id).await?;
        self.user(user_id).await?;
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        if member {
            sqlx::query("INSERT INTO project_members (project_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(project_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
                .bind(project_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        let action = if member {
            "member_add"
        } else {
            "member_remove"
        };
        audit_tx(
            &mut tx,
            actor,
            action,
            json!({"project_id": project_id, "user_id": user_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- items

    /// Inserts items; ones whose external id already exists in the project are skipped
    /// (re-importing a file is harmless). Returns (inserted, skipped).
    pub async fn insert_items(
        &self,
        actor: Option<i64>,
        project_id: i64,
        source: &str,
        items: &[NewItem],
    ) -> Result<(usize, usize)> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let mut inserted = 0;
        for it in items {
            let res = sqlx::query(
                "INSERT INTO items (project_id, external_id, prompt, responses, gold, label_count, created_at) \
                 VALUES ($1, $2, $3, $4, NULLIF($5, ''), 0, $6) ON CONFLICT (project_id, external_id) DO NOTHING",
            )
            .bind(project_id)
            .bind(&it.external_id)
            .bind(&it.prompt)
            .bind(serde_json::to_string(&it.responses)?)
            .bind(it.gold.as_ref().map(|g| g.to_string()).unwrap_or_default())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            inserted += res.rows_affected() as usize;
        }
        let skipped = items.len() - inserted;
        audit_tx(&mut tx, actor, "import", json!({"project_id": project_id, "source": source, "inserted": inserted, "skipped": skipped}))
            .await?;
        tx.commit().await?;
        Ok((inserted, skipped))
    }

    pub async fn item(&self, project_id: i64, item_id: i64) -> Result<Item> {
        let r = sqlx::query(&format!(
            "SELECT {ITEM_COLS} FROM items WHERE id = $1 AND project_id = $2"
        ))
        .bind(item_id)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("item {item_id} in project {project_id}")))?;
        item_from_row(&r)
    }

    pub async fn items(&self, project_id: i64) -> Result<Vec<Item>> {
        sqlx::query(&format!(
            "SELECT {ITEM_COLS} FROM items WHERE project_id = $1 ORDER BY id"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(item_from_row)
        .collect()
    }

    /// Stores reward-model uncertainty per item; `key` is the numeric item id or the
    /// external id. Errors name the first unknown key.
    pub async fn set_uncertainties(
        &self,
        actor: Option<i64>,
        project_id: i64,
        source: &str,
        values: &[(String, f64, usize)],
    ) -> Result<usize> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        for (key, value, line) in values {
            let id_num: i64 = key.parse().unwrap_or(-1);
            let res = sqlx::query("UPDATE items SET uncertainty = $1 WHERE project_id = $2 AND (id = $3 OR external_id = $4)")
                .bind(*value)
                .bind(project_id)
                .bind(id_num)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                return Err(invalid(format!(
                    "{source}:{line}: field \"item_id\": no item {key:?} in this project"
                )));
            }
        }
        audit_tx(
            &mut tx,
            actor,
            "import_scores",
            json!({"project_id": project_id, "source": source, "items": values.len()}),
        )
        .await?;
        tx.commit().await?;
        Ok(values.len())
    }

    // ---------------------------------------------------------------- queue

    /// The task an annotator sees next, as an assignment that reserves its item (a lease
    /// until `now + lease_ms`; submitting a label ends it). A task the annotator already
    /// has open is handed out again, so reloading the page neither moves on nor writes a
    /// row. Otherwise the next item is picked and leased in one serialised transaction
    /// (SQLite: the write lock; PostgreSQL: a per-project advisory lock), counting live
    /// leases next to live labels, so concurrent annotators do not overshoot the overlap
    /// target. `done` = the annotator's live labels so far. Candidates, walked in index
    /// order so this stays cheap on large projects:
    /// - when reward-model scores were imported, the most uncertain scored item first;
    /// - otherwise the least-labelled item.
    ///
    /// Gold items are interleaved every `GOLD_EVERY`-th item and are shown to everyone
    /// (also past the overlap target) once nothing else is left.
    pub async fn open_task(
        &self,
        project: &Project,
        user_id: i64,
        done: i64,
        lease_ms: i64,
    ) -> Result<Option<(Assignment, Item)>> {
        let now = now_ms();
        if let Some(open) = self.open_assignment(project.id, user_id, now).await? {
            return Ok(Some(open));
        }
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(project.id)
                .execute(&mut *tx)
                .await?;
        }
        let Some(item) = pick_item(&mut tx, project, user_id, done, now).await? else {
            return Ok(None);
        };
        let a = insert_assignment(
            &mut tx,
            &item,
            user_id,
            project.kind == TaskKind::Pairwise,
            now,
            lease_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(Some((a, item)))
    }

    /// An assignment for a specific item (changing an answer, or after an undo): the
    /// annotator's open one if any, else a new lease that keeps the order of the sides
    /// they saw before.
    pub async fn open_item(
        &self,
        item: &Item,
        user_id: i64,
        randomise: bool,
        lease_ms: i64,
    ) -> Result<Assignment> {
        let now = now_ms();
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        let open = sqlx::query(
            "SELECT id, shown_order, served_at FROM assignments WHERE item_id = $1 AND user_id = $2 AND lease_until > $3 ORDER BY id LIMIT 1",
        )
        .bind(item.id)
        .bind(user_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let a = match open {
            Some(r) => Assignment {
                id: r.try_get("id")?,
                item_id: item.id,
                user_id,
                shown_order: serde_json::from_str(&r.try_get::<String, _>("shown_order")?)?,
                served_at: r.try_get("served_at")?,
            },
            None => insert_assignment(&mut tx, item, user_id, randomise, now, lease_ms).await?,
        };
        tx.commit().await?;
        Ok(a)
    }

    /// The annotator's open (leased, unanswered) task in the project, oldest first.
    async fn open_assignment(
        &self,
        project_id: i64,
        user_id: i64,
        now: i64,
    ) -> Result<Option<(Assignment, Item)>> {
        let r = sqlx::query(&format!(
            "SELECT a.id AS a_id, a.shown_order, a.served_at, {} FROM assignments a JOIN items i ON i.id = a.item_id \
             WHERE a.user_id = $1 AND a.lease_until > $2 AND i.project_id = $3 ORDER BY a.id LIMIT 1",
            prefixed_item_cols()
        ))
        .bind(user_id)
        .bind(now)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref()
            .map(|r| assignment_and_item(r, user_id))
            .transpose()
    }

    /// A user's assignment together with its item, which must be in `project_id`.
    pub async fn assignment_item(
        &self,
        id: i64,
        user_id: i64,
        project_id: i64,
    ) -> Result<(Assignment, Item)> {
        let r = sqlx::query(&format!(
            "SELECT a.id AS a_id, a.shown_order, a.served_at, {} FROM assignments a JOIN items i ON i.id = a.item_id \
             WHERE a.id = $1 AND a.user_id = $2 AND i.project_id = $3",
            prefixed_item_cols()
        ))
        .bind(id)
        .bind(user_id)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("assignment {id} in project {project_id}")))?;
        assignment_and_item(&r, user_id)
    }

    // ---------------------------------------------------------------- labels

    /// Appends a label (or an undo) for (item, user), superseding the current head of
    /// that chain. Idempotent on (user, key): a repeat returns the original id.
    pub async fn submit_label(
        &self,
        project_id: i64,
        item_id: i64,
        user_id: i64,
        assignment: Option<&Assignment>,
        value: &LabelValue,
        idempotency_key: &str,
    ) -> Result<Submitted> {
        if idempotency_key.is_empty() || idempotency_key.len() > 128 {
            return Err(invalid("idempotency key must be 1–128 characters"));
        }
        let now = now_ms();
        let result = async {
            let _g = self.write_guard().await;
            let mut tx = self.pool.begin().await?;
            let head = sqlx::query(
                "SELECT l.id, l.kind FROM labels l WHERE l.item_id = $1 AND l.user_id = $2 \
                 AND NOT EXISTS (SELECT 1 FROM labels s WHERE s.supersedes = l.id)",
            )
            .bind(item_id)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (head_id, head_live) = match &head {
                Some(r) => (r.try_get::<i64, _>("id")?, r.try_get::<String, _>("kind")? != "undo"),
                None => (0, false),
            };
            let is_undo = matches!(value, LabelValue::Undo);
            if is_undo && !head_live {
                return Err(invalid("nothing to undo on this item"));
            }
            let id: i64 = sqlx::query(
                "INSERT INTO labels (project_id, item_id, user_id, assignment_id, kind, value, supersedes, idempotency_key, duration_ms, created_at) \
                 VALUES ($1, $2, $3, NULLIF($4, 0), $5, $6, NULLIF($7, 0), $8, NULLIF($9, -1), $10) RETURNING id",
            )
            .bind(project_id)
            .bind(item_id)
            .bind(user_id)
            .bind(assignment.map(|a| a.id).unwrap_or(0))
            .bind(value.kind())
            .bind(serde_json::to_string(value)?)
            .bind(head_id)
            .bind(idempotency_key)
            .bind(assignment.map(|a| (now - a.served_at).max(0)).unwrap_or(-1))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            let delta = match (head_live, is_undo) {
                (false, false) => 1,
                (true, true) => -1,
                _ => 0,
            };
            // Answered: the annotator's leases on the item end (the label now counts instead).
            sqlx::query("UPDATE assignments SET lease_until = NULL WHERE item_id = $1 AND user_id = $2 AND lease_until IS NOT NULL")
                .bind(item_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            if delta != 0 {
                sqlx::query("UPDATE items SET label_count = label_count + $1 WHERE id = $2")
                    .bind(delta)
                    .bind(item_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let action = if is_undo { "undo" } else if head_live { "label_change" } else { "label" };
            audit_tx(
                &mut tx,
                Some(user_id),
                action,
                json!({"project_id": project_id, "item_id": item_id, "label_id": id, "supersedes": (head_id != 0).then_some(head_id)}),
            )
            .await?;
            tx.commit().await?;
            Ok::<_, Error>(id)
        }
        .await;
        match result {
            Ok(id) => Ok(Submitted::New(id)),
            // Retries are rare, so the key is only looked up when the insert did not
            // happen: a stored key means this submission was already acknowledged once.
            Err(e) => match self.label_by_key(user_id, idempotency_key).await? {
                Some((id, item)) if item == item_id => Ok(Submitted::Duplicate(id)),
                // Not a retry of the same answer: storing nothing and acknowledging would
                // silently lose this one.
                Some(_) => Err(Error::Conflict(
                    "this answer carries the submission key of an answer to another item, so it was not stored; reload the task page and answer again".into(),
                )),
                None => match e {
                    Error::Other(e) if is_unique_violation(&e) => {
                        Err(Error::Conflict("this item was labelled concurrently in another tab; reload".into()))
                    }
                    e => Err(e),
                },
            },
        }
    }

    /// (label id, item id) of the user's label stored under an idempotency key.
    pub async fn label_by_key(&self, user_id: i64, key: &str) -> Result<Option<(i64, i64)>> {
        Ok(sqlx::query(
            "SELECT id, item_id FROM labels WHERE user_id = $1 AND idempotency_key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
        .transpose()?)
    }

    /// The user's most recent live labels in the project, newest first (the first one
    /// is what "undo" withdraws).
    pub async fn recent_live_labels(
        &self,
        project_id: i64,
        user_id: i64,
        limit: i64,
    ) -> Result<Vec<Label>> {
        sqlx::query(&format!(
            "SELECT {LABEL_COLS} FROM labels l WHERE l.project_id = $1 AND l.user_id = $2 AND {LIVE} ORDER BY l.id DESC LIMIT $3"
        ))
        .bind(project_id)
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(label_from_row)
        .collect()
    }

    pub async fn last_live_label(&self, project_id: i64, user_id: i64) -> Result<Option<Label>> {
        Ok(self
            .recent_live_labels(project_id, user_id, 1)
            .await?
            .into_iter()
            .next())
    }

    /// The user's live label on an item, if any.
    pub async fn live_label(&self, item_id: i64, user_id: i64) -> Result<Option<Label>> {
        let r = sqlx::query(&format!(
            "SELECT {LABEL_COLS} FROM labels l WHERE l.item_id = $1 AND l.user_id = $2 AND {LIVE}"
        ))
        .bind(item_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(label_from_row).transpose()
    }

    /// All live labels of a project, oldest first.
    pub async fn live_labels(&self, project_id: i64) -> Result<Vec<Label>> {
        sqlx::query(&format!(
            "SELECT {LABEL_COLS} FROM labels l WHERE l.project_id = $1 AND {LIVE} ORDER BY l.id"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(label_from_row)
        .collect()
    }

    /// Every label row (history included) of a user in a project, oldest first.
    pub async fn label_history(&self, project_id: i64, user_id: i64) -> Result<Vec<Label>> {
        sqlx::query(&format!("SELECT {LABEL_COLS} FROM labels l WHERE l.project_id = $1 AND l.user_id = $2 ORDER BY l.id"))
            .bind(project_id)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(label_from_row)
            .collect()
    }

    /// (my live labels, items still available to me). One round trip: the items I can
    /// still get are the eligible ones minus the eligible ones I already labelled.
    pub async fn progress(&self, project: &Project, user_id: i64) -> Result<(i64, i64)> {
        let r = sqlx::query(&format!(
            "SELECT (SELECT COUNT(*) FROM labels l WHERE l.project_id = $1 AND l.user_id = $3 AND {LIVE}) AS done, \
               (SELECT COUNT(*) FROM items i WHERE i.project_id = $1 AND (i.label_count < $2 OR i.gold IS NOT NULL)) AS eligible, \
               (SELECT COUNT(*) FROM labels l JOIN items i ON i.id = l.item_id WHERE l.project_id = $1 AND l.user_id = $3 \
                  AND {LIVE} AND (i.label_count < $2 OR i.gold IS NOT NULL)) AS mine"
        ))
        .bind(project.id)
        .bind(project.overlap)
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        let (done, eligible, mine): (i64, i64, i64) = (
            r.try_get("done")?,
            r.try_get("eligible")?,
            r.try_get("mine")?,
        );
        Ok((done, eligible - mine))
    }

    /// (items with ≥ overlap live labels, items): two index range counts, cheap enough
    /// for every task page.
    pub async fn completion(&self, project: &Project) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM items WHERE project_id = $1 AND label_count >= $2) AS full_n, \
               (SELECT COUNT(*) FROM items WHERE project_id = $1) AS n",
        )
        .bind(project.id)
        .bind(project.overlap)
        .fetch_one(&self.pool)
        .await?;
        Ok((r.try_get("full_n")?, r.try_get("n")?))
    }

    /// (items, items with ≥ overlap live labels, gold items, live labels).
    pub async fn project_counts(&self, project: &Project) -> Result<(i64, i64, i64, i64)> {
        let r = sqlx::query(
            // Sums are cast: Postgres returns SUM(bigint) as NUMERIC, which Any can't decode.
            "SELECT COUNT(*) AS n, \
               CAST(COALESCE(SUM(CASE WHEN label_count >= $2 THEN 1 ELSE 0 END), 0) AS BIGINT) AS full_n, \
               CAST(COALESCE(SUM(CASE WHEN gold IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT) AS gold_n, \
               CAST(COALESCE(SUM(label_count), 0) AS BIGINT) AS labels_n \
             FROM items WHERE project_id = $1",
        )
        .bind(project.id)
        .bind(project.overlap)
        .fetch_one(&self.pool)
        .await?;
        let get = |c: &str| -> Result<i64> { Ok(r.try_get::<i64, _>(c)?) };
        Ok((get("n")?, get("full_n")?, get("gold_n")?, get("labels_n")?))
    }

    // ---------------------------------------------------------------- audit

    pub async fn audit(&self, actor: Option<i64>, action: &str, detail: Value) -> Result<()> {
        let _g = self.write_guard().await;
        let mut tx = self.pool.begin().await?;
        audit_tx(&mut tx, actor, action, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_log(&self, limit: i64, before_id: i64) -> Result<Vec<AuditEntry>> {
        sqlx::query(
            "SELECT a.id, a.at, a.user_id, u.username, a.action, a.detail FROM audit_log a LEFT JOIN users u ON u.id = a.user_id \
             WHERE a.id < $1 ORDER BY a.id DESC LIMIT $2",
        )
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                user_id: opt_i64(r, "user_id"),
                username: r.try_get("username")?,
                action: r.try_get("action")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect()
    }
}

fn prefixed_item_cols() -> String {
    ITEM_COLS
        .split(", ")
        .map(|c| format!("i.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn assignment_and_item(r: &AnyRow, user_id: i64) -> Result<(Assignment, Item)> {
    let item = item_from_row(r)?;
    let a = Assignment {
        id: r.try_get("a_id")?,
        item_id: item.id,
        user_id,
        shown_order: serde_json::from_str(&r.try_get::<String, _>("shown_order")?)?,
        served_at: r.try_get("served_at")?,
    };
    Ok((a, item))
}

/// The next item for an annotator (see `Db::open_task`); run inside its transaction.
async fn pick_item(
    tx: &mut Transaction<'_, Any>,
    project: &Project,
    user_id: i64,
    done: i64,
    now: i64,
) -> Result<Option<Item>> {
    const GOLD_EVERY: i64 = 10;
    let not_mine = format!(
        "NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.user_id = $2 AND {LIVE})"
    );
    // Labels plus open leases of others must stay under the overlap target.
    let room = "i.label_count + (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.lease_until > $4) < $3";
    let gold_sql = format!("SELECT {ITEM_COLS} FROM items i WHERE i.project_id = $1 AND i.gold IS NOT NULL AND {not_mine} ORDER BY i.id LIMIT 1");
    let queries = [
        format!(
            "SELECT {ITEM_COLS} FROM items i WHERE i.project_id = $1 AND i.uncertainty IS NOT NULL AND i.label_count < $3 \
             AND {room} AND {not_mine} ORDER BY i.uncertainty DESC, i.id LIMIT 1"
        ),
        format!(
            "SELECT {ITEM_COLS} FROM items i WHERE i.project_id = $1 AND i.label_count < $3 AND {room} AND {not_mine} \
             ORDER BY i.label_count, i.id LIMIT 1"
        ),
    ];
    // (query, whether it uses the overlap and time parameters $3, $4)
    let gold = (gold_sql.as_str(), false);
    let (scored, least) = ((queries[0].as_str(), true), (queries[1].as_str(), true));
    let order = if (done + 1) % GOLD_EVERY == 0 {
        [gold, scored, least]
    } else {
        [scored, least, gold]
    };
    for (sql, room_params) in order {
        let mut q = sqlx::query(sql).bind(project.id).bind(user_id);
        if room_params {
            q = q.bind(project.overlap).bind(now);
        }
        let r = q.fetch_optional(&mut **tx).await?;
        if let Some(r) = r {
            return Ok(Some(item_from_row(&r)?));
        }
    }
    Ok(None)
}

/// A new leased assignment. Pairwise sides are randomised the first time an annotator
/// sees an item and kept on later views (after an undo, muscle memory must still match).
async fn insert_assignment(
    tx: &mut Transaction<'_, Any>,
    item: &Item,
    user_id: i64,
    randomise: bool,
    now: i64,
    lease_ms: i64,
) -> Result<Assignment> {
    let mut fresh: Vec<usize> = (0..item.responses.len()).collect();
    if randomise && rand::thread_rng().gen_bool(0.5) {
        fresh.reverse();
    }
    // One statement (it runs under the per-project lock): the order this annotator saw
    // last time, else the fresh one.
    let r = sqlx::query(
        "INSERT INTO assignments (item_id, user_id, shown_order, served_at, lease_until) VALUES ($1, $2, \
         COALESCE((SELECT p.shown_order FROM assignments p WHERE p.item_id = $1 AND p.user_id = $2 ORDER BY p.id DESC LIMIT 1), $3), \
         $4, $5) RETURNING id, shown_order",
    )
    .bind(item.id)
    .bind(user_id)
    .bind(serde_json::to_string(&fresh)?)
    .bind(now)
    .bind(now + lease_ms)
    .fetch_one(&mut **tx)
    .await?;
    let id: i64 = r.try_get("id")?;
    let order: Vec<usize> = serde_json::from_str(&r.try_get::<String, _>("shown_order")?)?;
    Ok(Assignment {
        id,
        item_id: item.id,
        user_id,
        shown_order: order,
        served_at: now,
    })
}

fn is_unique_violation(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .is_some_and(|d| d.is_unique_violation())
}
