//! Stand-in for `nimbus __sandbox-init` in this crate's tests and benches: the host
//! starts `<this binary> __sandbox-init` exactly as it starts the real binary.
#![forbid(unsafe_code)]

fn main() {
    if std::env::args().nth(1).as_deref() == Some(nimbus_sandbox::INIT_ARG) {
        nimbus_sandbox::init_main();
    }
    eprintln!(
        "usage: {} {}",
        env!("CARGO_BIN_NAME"),
        nimbus_sandbox::INIT_ARG
    );
    std::process::exit(2);
}
