//! `cnnfctl`: the CNNF operator CLI. Everything lives in the library.

fn main() -> std::process::ExitCode {
    cnnf_ctl::main()
}
