//! `cnnf auth init` and `cnnf nodes ...`: the auth directory on disk
//! (`cnnf_auth::AuthDir`), and the push of a re-signed account JWT to the
//! running server (`$SYS.REQ.CLAIMS.UPDATE`, as the system account's user),
//! which closes the connections of revoked users.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use cnnf_auth::{AuthDir, AuthError};

use crate::Usage;

/// The subject a full resolver takes account JWT updates on.
const CLAIMS_UPDATE: &str = "$SYS.REQ.CLAIMS.UPDATE";

/// `cnnf nodes` commands.
#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Issues a creds file for one node agent: it may publish only that
    /// node's events and read only its verdict table and the identities.
    Enroll {
        /// The auth directory (`cnnf auth init --dir`).
        #[arg(long)]
        auth_dir: PathBuf,
        /// Cluster of the node.
        #[arg(long)]
        cluster: String,
        /// The node, as its agent names it (`CNNF_NODE`).
        #[arg(long)]
        node: String,
        /// Where to write the creds file (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Every enrolment: cluster, node, user key, issued, revoked.
    List {
        /// The auth directory.
        #[arg(long)]
        auth_dir: PathBuf,
    },
    /// Revokes a node's credentials and pushes the new account JWT to the
    /// server (with the auth directory's system creds): its connection is
    /// closed, and it cannot log in again.
    Revoke {
        /// The auth directory.
        #[arg(long)]
        auth_dir: PathBuf,
        /// Cluster of the node.
        #[arg(long)]
        cluster: String,
        /// The node.
        #[arg(long)]
        node: String,
    },
}

/// An auth error as the CLI reports it: bad names and wrong directories
/// are bad usage.
fn reported(error: AuthError) -> anyhow::Error {
    match error {
        AuthError::Name(_) | AuthError::NotInitialised(_) | AuthError::NotEnrolled { .. } => {
            Usage(error.to_string()).into()
        }
        other => other.into(),
    }
}

fn open(dir: &Path) -> anyhow::Result<AuthDir> {
    AuthDir::open(dir).map_err(|error| reported(error).context(format!("--auth-dir {}", dir.display())))
}

/// `cnnf auth init --dir D`.
pub fn init(dir: &Path) -> anyhow::Result<()> {
    let (auth, created) = AuthDir::init(dir).map_err(reported)?;
    if created {
        println!(
            "created the credentials of this installation in {}",
            auth.path().display()
        );
    } else {
        println!("{} already holds credentials; nothing changed", auth.path().display());
    }
    println!("operator          {}", auth.operator_key());
    println!("system account    {}", auth.system_account_key());
    println!("CNNF account      {}", auth.account_key());
    println!("services creds    {}", auth.services_creds().display());
    println!("system creds      {}", auth.system_creds().display());
    println!("nats-server file  {} (include it)", auth.include_file().display());
    Ok(())
}

/// `cnnf nodes ...`; `url` and `options` (less its creds: the system
/// creds are used) reach the server for a revocation.
pub async fn run(command: NodesCommand, url: &str, options: &cnnf_bus::NatsOptions) -> anyhow::Result<()> {
    match command {
        NodesCommand::Enroll {
            auth_dir,
            cluster,
            node,
            out,
        } => {
            let mut auth = open(&auth_dir)?;
            if let Some(parent) = out.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                if !parent.is_dir() {
                    return Err(Usage(format!(
                        "--out {}: {} is not a directory",
                        out.display(),
                        parent.display()
                    ))
                    .into());
                }
            }
            let enrolment = auth.enroll(&cluster, &node, &out).map_err(reported)?;
            println!(
                "enrolled node {} of cluster {} as user {}; creds in {}",
                enrolment.node,
                enrolment.cluster,
                enrolment.user,
                out.display()
            );
            Ok(())
        }
        NodesCommand::List { auth_dir } => {
            let auth = open(&auth_dir)?;
            println!(
                "{:<16} {:<20} {:<57} {:<21} REVOKED",
                "CLUSTER", "NODE", "USER", "ISSUED"
            );
            for enrolment in auth.nodes() {
                println!(
                    "{:<16} {:<20} {:<57} {:<21} {}",
                    enrolment.cluster,
                    enrolment.node,
                    enrolment.user,
                    cnnf_auth::format_time(enrolment.issued),
                    enrolment.revoked.map_or_else(|| "-".to_owned(), cnnf_auth::format_time)
                );
            }
            Ok(())
        }
        NodesCommand::Revoke {
            auth_dir,
            cluster,
            node,
        } => {
            let mut auth = open(&auth_dir)?;
            let account_jwt = auth.revoke(&cluster, &node).map_err(reported)?;
            println!(
                "revoked node {node} of cluster {cluster} in {} (a restarted server keeps it)",
                auth.path().display()
            );
            let options = cnnf_bus::NatsOptions {
                credentials: Some(auth.system_creds()),
                ..options.clone()
            };
            let answer = push_account(url, &options, &account_jwt)
                .await
                .with_context(|| format!("the revocation is recorded, but the running server at {url} was not told (run the command again to retry)"))?;
            println!("pushed the account to the server at {url}: {answer}");
            Ok(())
        }
    }
}

/// Sends an account JWT to `$SYS.REQ.CLAIMS.UPDATE` and returns the
/// server's message.
async fn push_account(url: &str, options: &cnnf_bus::NatsOptions, account_jwt: &str) -> anyhow::Result<String> {
    let client = cnnf_bus::connect_options("cnnf-cli", options)
        .await?
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url} as the system account"))?;
    let reply = client
        .request(CLAIMS_UPDATE, account_jwt.to_owned().into())
        .await
        .context("requesting the account update")?;
    let answer: serde_json::Value =
        serde_json::from_slice(&reply.payload).context("the server's answer to the account update is not JSON")?;
    if let Some(error) = answer.get("error") {
        anyhow::bail!("the server refused the account update: {error}");
    }
    Ok(answer
        .pointer("/data/message")
        .and_then(|message| message.as_str())
        .unwrap_or("updated")
        .to_owned())
}
