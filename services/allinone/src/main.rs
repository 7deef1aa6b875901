//! `cnnf-allinone`: see the library for what it runs.

use cnnf_allinone::{run, Config, DEFAULT_HTTP_ADDR};

fn main() -> std::process::ExitCode {
    // The policy service's signing key is checked before anything starts:
    // one that cannot be read exits with status 64.
    let config: Config = match cnnf_service::parse_or_exit() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(error) = config.policy().validate() {
        eprintln!("cnnf-allinone: invalid configuration: {error:#}");
        return std::process::ExitCode::from(cnnf_service::EXIT_BAD_CONFIG);
    }
    cnnf_service::main(
        "cnnf-allinone",
        DEFAULT_HTTP_ADDR,
        |config: &Config| &config.common,
        |config, health| run(config, health, cnnf_service::shutdown_signal()),
    )
}
