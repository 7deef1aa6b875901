//! `cnnf-allinone`: see the library for what it runs.

use cnnf_allinone::{run, Config, DEFAULT_HTTP_ADDR};

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        "cnnf-allinone",
        DEFAULT_HTTP_ADDR,
        |config: &Config| &config.common,
        |config, health| run(config, health, cnnf_service::shutdown_signal()),
    )
}
