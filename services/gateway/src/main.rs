//! The `cnnf-gateway` process around [`cnnf_gateway::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_gateway::NAME,
        cnnf_gateway::DEFAULT_HTTP_ADDR,
        |config: &cnnf_gateway::Config| &config.common,
        |config, health| cnnf_gateway::run(config, health, cnnf_service::shutdown_signal()),
    )
}
