//! The `cnnf-audit` process around [`cnnf_audit::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_audit::NAME,
        cnnf_audit::DEFAULT_HTTP_ADDR,
        |config: &cnnf_audit::Config| &config.common,
        |config, health| cnnf_audit::run(config, health, cnnf_service::shutdown_signal()),
    )
}
