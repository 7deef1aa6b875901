//! The `cnnf-modeler` process around [`cnnf_modeler::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_modeler::NAME,
        cnnf_modeler::DEFAULT_HTTP_ADDR,
        |config: &cnnf_modeler::Config| &config.common,
        |config, health| cnnf_modeler::run(config, health, cnnf_service::shutdown_signal()),
    )
}
