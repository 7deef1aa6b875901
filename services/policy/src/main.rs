//! The `cnnf-policy` process around [`cnnf_policy::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_policy::NAME,
        cnnf_policy::DEFAULT_HTTP_ADDR,
        |config: &cnnf_policy::Config| &config.common,
        |config, health| cnnf_policy::run(config, health, cnnf_service::shutdown_signal()),
    )
}
