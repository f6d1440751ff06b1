//! Command-line interface: `rlhf feedback serve|import|import-scores|export|add-user|create-project|assign`.
//! The workspace CLI embeds [`FeedbackArgs`] and calls [`run`] (blocking) or
//! [`run_async`]; this crate's own `rlhf-feedback` binary does the same.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::db::{Db, Open};
use crate::export::{export_rows_with, to_jsonl, Format, Options as ExportOptions};
use crate::import::{decode_utf8, expand, parse_jsonl, parse_scores, Generate};
use crate::model::{parse_criteria, NewProject, Role, TaskKind};
use crate::web::{self, Config};

#[derive(Debug, Args)]
pub struct FeedbackArgs {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct DbArg {
    /// SQLite file path, or a postgres://user:pass@host/db URL for a shared server.
    #[arg(long, env = "RLHF_FEEDBACK_DB", default_value = "feedback.sqlite")]
    pub db: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the web app.
    Serve {
        #[command(flatten)]
        db: DbArg,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Public base URL (used in invite links; https → Secure cookies).
        #[arg(long)]
        public_url: Option<String>,
        /// Session lifetime in hours.
        #[arg(long, default_value_t = 12.0)]
        session_hours: f64,
    },
    /// Create a user. Prints a single-use invite link unless --password-stdin is given.
    AddUser {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "annotator", value_parser = ["admin", "annotator"])]
        role: String,
        /// Read the password from standard input instead of printing an invite link.
        #[arg(long)]
        password_stdin: bool,
        /// Base URL for the invite link.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        public_url: String,
    },
    /// Create a project.
    CreateProject {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        kind: TaskKind,
        /// Rating criteria, comma-separated.
        #[arg(long, default_value = "helpful,truthful,harmless")]
        criteria: String,
        #[arg(long, default_value_t = 5)]
        likert_max: i64,
        /// Annotators per item.
        #[arg(long, default_value_t = 3)]
        overlap: i64,
        /// Flag annotators whose median time per item is below this many seconds.
        #[arg(long, default_value_t = 3.0)]
        min_seconds: f64,
        /// Guidelines text file (markdown-ish).
        #[arg(long)]
        guidelines: Option<PathBuf>,
    },
    /// Assign annotators to a project.
    Assign {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        project: String,
        /// Usernames.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Import prompts and candidate responses from JSONL.
    Import {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        project: String,
        file: PathBuf,
        /// Generate candidates for rows without responses via this OpenAI-compatible server.
        #[arg(long)]
        generate_url: Option<String>,
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value_t = 2)]
        n: usize,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
    },
    /// Import reward-model uncertainty per item (`{"item_id", "uncertainty"}` JSONL).
    ImportScores {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        project: String,
        file: PathBuf,
    },
    /// Export labels as training JSONL.
    Export {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        project: String,
        /// Output format (default: the project's natural one).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Replace e-mail addresses and phone numbers with placeholders.
        #[arg(long)]
        scrub_pii: bool,
        /// Decide items by the annotator-reliability model (pairwise: Crowd-BT, rating:
        /// Dawid–Skene) instead of raw vote counts; rows get a `confidence` field and a
        /// preference `margin` of 2·confidence − 1.
        #[arg(long)]
        by_reliability: bool,
        /// Leave out items whose posterior confidence is below this (0–1); implies --by-reliability.
        #[arg(long)]
        min_confidence: Option<f64>,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Runs a command on a fresh tokio runtime (for callers that are not async).
pub fn run(args: FeedbackArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(args))
}

pub async fn run_async(args: FeedbackArgs) -> Result<()> {
    match args.command {
        Command::Serve {
            db,
            addr,
            public_url,
            session_hours,
        } => {
            let db = Db::connect(&db.db).await?;
            let public_url = public_url.unwrap_or_else(|| format!("http://{addr}"));
            if db.count_users().await? == 0 {
                // First start: hand out a bootstrap link for the first admin.
                let id = db.create_user(None, "admin", Role::Admin, None).await?;
                let token = db.create_invite(None, id, 7 * 24 * 3600 * 1000).await?;
                eprintln!(
                    "No users yet. Set the admin password here: {}/invite/{token}",
                    public_url.trim_end_matches('/')
                );
            }
            let cfg = Config {
                session_ttl_ms: (session_hours * 3600.0 * 1000.0) as i64,
                secure_cookies: public_url.starts_with("https://"),
                public_url,
                ..Config::default()
            };
            if cfg.session_ttl_ms <= 0 {
                bail!("--session-hours must be positive");
            }
            web::serve(db, cfg, addr).await
        }
        Command::AddUser {
            db,
            username,
            role,
            password_stdin,
            public_url,
        } => {
            let db = Db::connect(&db.db).await?;
            let role = Role::parse(&role)?;
            let hash = if password_stdin {
                let mut p = String::new();
                std::io::stdin().read_to_string(&mut p)?;
                Some(crate::auth::hash_password(
                    p.trim_end_matches(['\n', '\r']),
                )?)
            } else {
                None
            };
            let id = db
                .create_user(None, &username, role, hash.as_deref())
                .await?;
            if hash.is_none() {
                let token = db.create_invite(None, id, 7 * 24 * 3600 * 1000).await?;
                println!("{}/invite/{token}", public_url.trim_end_matches('/'));
            } else {
                println!("created {} {username} (id {id})", role.as_str());
            }
            Ok(())
        }
        Command::CreateProject {
            db,
            name,
            kind,
            criteria,
            likert_max,
            overlap,
            min_seconds,
            guidelines,
        } => {
            let db = Db::connect(&db.db).await?;
            let mut p = NewProject::new(&name, kind);
            p.criteria = parse_criteria(&criteria);
            p.likert_max = likert_max;
            p.overlap = overlap;
            p.min_seconds = min_seconds;
            if let Some(g) = guidelines {
                p.guidelines = std::fs::read_to_string(&g)
                    .with_context(|| format!("reading {}", g.display()))?;
            }
            let id = db.create_project(None, &p).await?;
            println!("created project {name} (id {id})");
            Ok(())
        }
        Command::Assign { db, project, users } => {
            let db = Db::open(&db.db, Open::MustExist).await?;
            let p = db.project_by_name(&project).await?;
            for u in users {
                let (user, _) = db
                    .user_by_name(&u)
                    .await?
                    .with_context(|| format!("no user {u:?}"))?;
                db.set_member(None, p.id, user.id, true).await?;
            }
            Ok(())
        }
        Command::Import {
            db,
            project,
            file,
            generate_url,
            model,
            n,
            max_tokens,
            temperature,
        } => {
            let db = Db::open(&db.db, Open::MustExist).await?;
            let p = db.project_by_name(&project).await?;
            let src = file.display().to_string();
            let data = decode_utf8(
                &src,
                std::fs::read(&file).with_context(|| format!("reading {src}"))?,
            )?;
            let mut rows = parse_jsonl(&src, &data)?;
            if let Some(url) = generate_url {
                let g = Generate {
                    url,
                    model,
                    n,
                    max_tokens,
                    temperature,
                    api_key: std::env::var("RLHF_FEEDBACK_API_KEY").ok(),
                };
                let k = g.fill(&mut rows).await?;
                eprintln!("generated candidates for {k} prompts");
            }
            let items = expand(&src, &rows, p.kind, &p.criteria, p.likert_max)?;
            let (ins, skip) = db.insert_items(None, p.id, &src, &items).await?;
            println!(
                "{} rows → {ins} items added, {skip} already present",
                rows.len()
            );
            Ok(())
        }
        Command::ImportScores { db, project, file } => {
            let db = Db::open(&db.db, Open::MustExist).await?;
            let p = db.project_by_name(&project).await?;
            let src = file.display().to_string();
            let data = decode_utf8(
                &src,
                std::fs::read(&file).with_context(|| format!("reading {src}"))?,
            )?;
            let n = db
                .set_uncertainties(None, p.id, &src, &parse_scores(&src, &data)?)
                .await?;
            println!("uncertainty stored for {n} items");
            Ok(())
        }
        Command::Export {
            db,
            project,
            format,
            scrub_pii,
            by_reliability,
            min_confidence,
            output,
        } => {
            let db = Db::open(&db.db, Open::MustExist).await?;
            let p = db.project_by_name(&project).await?;
            let format = format.unwrap_or(Format::for_kind(p.kind)[0]);
            let opts = ExportOptions {
                scrub: scrub_pii,
                by_reliability,
                min_confidence,
            };
            let rows = export_rows_with(
                &p,
                &db.items(p.id).await?,
                &db.live_labels(p.id).await?,
                format,
                &opts,
            )?;
            db.audit(
                None,
                "export",
                serde_json::json!({"project_id": p.id, "format": format.as_str(), "scrub_pii": scrub_pii, "by_reliability": by_reliability, "min_confidence": min_confidence, "rows": rows.len(), "via": "cli"}),
            )
            .await?;
            let text = to_jsonl(&rows);
            match output {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {} rows to {}", rows.len(), path.display());
                }
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}
