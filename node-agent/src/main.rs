//! The `cnnf-agent` process around [`cnnf_agent::run`].

fn main() -> std::process::ExitCode {
    // Check everything clap cannot before anything starts: a bad value
    // exits with status 64 and says which flag.
    let config: cnnf_agent::Config = match cnnf_service::parse_or_exit() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(error) = config.validate() {
        eprintln!("{}: invalid configuration: {error:#}", cnnf_agent::NAME);
        return std::process::ExitCode::from(cnnf_service::EXIT_BAD_CONFIG);
    }
    // Uninstall: remove the chains and exit, without starting anything.
    if config.remove_chains {
        return match cnnf_agent::uninstall(&config) {
            Ok(()) => {
                println!("{}: chains of prefix {} removed", cnnf_agent::NAME, config.chain_prefix);
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{}: {error:#}", cnnf_agent::NAME);
                std::process::ExitCode::FAILURE
            }
        };
    }
    cnnf_service::main(
        cnnf_agent::NAME,
        cnnf_agent::DEFAULT_HTTP_ADDR,
        |config: &cnnf_agent::Config| &config.common,
        |config, health| cnnf_agent::run(config, health, cnnf_service::shutdown_signal()),
    )
}
