//! `cnnf-table-key`: makes and shows verdict-table signing keys, for key
//! rotation (docs/table-signing.md).
//!
//! ```text
//! cnnf-table-key generate <secret-file>   # writes <secret-file> (0600) and <name>.pub beside it
//! cnnf-table-key public <secret-file>     # prints the public key line for agents
//! cnnf-table-key check <public-file>      # lists the ids of a trusted-keys file
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser as _;
use cnnf_signing::files;

#[derive(Debug, clap::Parser)]
#[command(name = "cnnf-table-key", version, about = "Verdict-table signing keys")]
enum Command {
    /// Generates a new secret key file and its public key file beside it.
    Generate {
        /// The new secret key file (never overwritten).
        secret: PathBuf,
    },
    /// Prints the public key line of a secret key file.
    Public {
        /// The secret key file.
        secret: PathBuf,
    },
    /// Checks a trusted-keys file and prints the id of every key in it.
    Check {
        /// The public (trusted) keys file.
        public: PathBuf,
    },
}

fn main() -> ExitCode {
    let command = match Command::try_parse() {
        Ok(command) => command,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let outcome = match command {
        Command::Generate { secret } => files::generate(&secret).map(|key| {
            println!(
                "key {} written to {} (public key: {})",
                key.id(),
                secret.display(),
                files::public_key_path(&secret).display()
            );
        }),
        Command::Public { secret } => files::read_signing_key(&secret).map(|key| {
            println!("{}", key.public_key().to_line());
        }),
        Command::Check { public } => files::read_public_keys(&public).map(|keys| {
            for key in keys {
                println!("{}", key.id());
            }
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cnnf-table-key: {error}");
            ExitCode::FAILURE
        }
    }
}
