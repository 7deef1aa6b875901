//! The `cnnf-ingest` process around [`cnnf_ingest::run`].

fn main() -> std::process::ExitCode {
    cnnf_service::main(
        cnnf_ingest::NAME,
        cnnf_ingest::DEFAULT_HTTP_ADDR,
        |config: &cnnf_ingest::Config| &config.common,
        |config, health| cnnf_ingest::run(config, health, cnnf_service::shutdown_signal()),
    )
}
