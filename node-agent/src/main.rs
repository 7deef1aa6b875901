//! The `cnnf-agent` process around [`cnnf_agent::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_agent::NAME,
        cnnf_agent::DEFAULT_HTTP_ADDR,
        |config: &cnnf_agent::Config| &config.common,
        |config, health| cnnf_agent::run(config, health, cnnf_service::shutdown_signal()),
    )
}
