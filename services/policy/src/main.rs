//! The `cnnf-policy` process around [`cnnf_policy::run`].

fn main() -> std::process::ExitCode {
    // A signing key that cannot be read is bad configuration (status 64),
    // found before anything starts.
    let config: cnnf_policy::Config = match cnnf_service::parse_or_exit() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(error) = config.validate() {
        eprintln!("{}: invalid configuration: {error:#}", cnnf_policy::NAME);
        return std::process::ExitCode::from(cnnf_service::EXIT_BAD_CONFIG);
    }
    cnnf_service::main(
        cnnf_policy::NAME,
        cnnf_policy::DEFAULT_HTTP_ADDR,
        |config: &cnnf_policy::Config| &config.common,
        |config, health| cnnf_policy::run(config, health, cnnf_service::shutdown_signal()),
    )
}
