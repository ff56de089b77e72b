//! Runs the runtime shims' own suite (runtimes/tests/test_shims.py) as part of
//! `cargo test`, so the README's one test command covers them.

use std::path::Path;
use std::process::Command;

#[test]
fn runtime_shim_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg("runtimes/tests/test_shims.py")
        .current_dir(&root)
        .output()
        .expect("run python3 runtimes/tests/test_shims.py");
    assert!(
        out.status.success(),
        "shim suite failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
