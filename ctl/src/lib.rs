//! `cnnfctl`: the CNNF operator CLI.
//!
//! Operators (and their scripts) reach every CNNF API through one address,
//! the operator gateway, with a bearer token whose role decides what they
//! may do. `cnnfctl` is that address's command line: the mode, network
//! objects and rules (every write based on the revision just read, so
//! concurrent writers never lose an update), models and learned
//! connections, policy export and import, and the audit questions (list,
//! tail, replay, simulate, who held an address, the state at an instant).
//!
//! Output is an aligned table for people or one JSON document (proto3 JSON
//! of the API's messages) for scripts, and the exit code says what kind of
//! failure happened ([`error::Kind`]).
//!
//! Must never depend on a service crate, NATS or a storage engine: it is
//! installed on operators' laptops and talks gRPC only.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod error;
pub mod table;
pub mod timefmt;

mod audits;
mod models;
mod policy;
mod show;

use std::io::Write as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::cli::{Cli, Command, Output};
use crate::client::{Connection, Target};
use crate::error::{CtlError, Kind, Result};

/// What every command needs: the connection and the output format.
pub struct Ctx {
    /// The connection to the gateway.
    pub conn: Connection,
    /// How to print.
    pub output: Output,
}

impl Ctx {
    /// Prints `value` as JSON, or the table `text` makes.
    fn emit<T: serde::Serialize>(&self, value: &T, text: impl FnOnce() -> String) -> Result<()> {
        let out = match self.output {
            Output::Json => {
                let mut json = serde_json::to_string_pretty(value).map_err(|error| self.json_error(error))?;
                json.push('\n');
                json
            }
            Output::Table => text(),
        };
        write_stdout(out.as_bytes())
    }

    /// Prints one line (streams).
    fn line(&self, text: &str) -> Result<()> {
        write_stdout(format!("{text}\n").as_bytes())
    }

    fn json_error(&self, error: serde_json::Error) -> CtlError {
        CtlError::new(Kind::Other, "encoding JSON", error.to_string())
    }
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|error| CtlError::new(Kind::Other, "writing the output", error.to_string()))
}

/// Where to connect and with which credentials, from the global options.
fn target(cli: &Cli) -> Result<Target> {
    let global = &cli.global;
    let token = match &global.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| CtlError::bad("--token-file", format!("reading {}: {error}", path.display())))?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(CtlError::bad("--token-file", format!("{} is empty", path.display())));
            }
            Some(token)
        }
        None => global.token.clone().filter(|token| !token.trim().is_empty()),
    };
    Ok(Target {
        server: global.server.clone(),
        token,
        ca_cert: global.ca_cert.clone(),
        client_cert: global.client_cert.clone(),
        client_key: global.client_key.clone(),
    })
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Completions { shell } = &cli.command {
        let mut out = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "cnnfctl", &mut out);
        return write_stdout(&out);
    }
    let conn = Connection::open(&target(&cli)?).await?;
    let ctx = Ctx {
        conn,
        output: cli.global.output,
    };
    match cli.command {
        Command::Mode(command) => policy::mode(&ctx, command).await,
        Command::Objects(command) => policy::objects(&ctx, command).await,
        Command::Rules(command) => policy::rules(&ctx, command).await,
        Command::Policy(command) => policy::policy(&ctx, command).await,
        Command::Models(command) => models::models(&ctx, command).await,
        Command::Learned(command) => models::learned(&ctx, command).await,
        Command::Audits(command) => audits::audits(&ctx, command).await,
        Command::Replay(args) => audits::replay(&ctx, args).await,
        Command::Simulate(args) => audits::simulate(&ctx, args).await,
        Command::WhoHeld(args) => audits::who_held(&ctx, args).await,
        Command::StateAt(args) => audits::state_at(&ctx, args).await,
        Command::Completions { .. } => unreachable!("handled above"),
    }
}

/// The whole program: parse, run, print the error, choose the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(Kind::BadArgument.exit_code())
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cnnfctl: starting the runtime: {error}");
            return ExitCode::from(Kind::Other.exit_code());
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cnnfctl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
