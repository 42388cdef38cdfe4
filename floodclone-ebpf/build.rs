use std::path::PathBuf;

/// Make the build depend on bpf-linker, so that upgrading it rebuilds the programs.
fn main() {
    let linker = which::which("bpf-linker").unwrap_or_else(|_| PathBuf::from("bpf-linker"));
    println!("cargo:rerun-if-changed={}", linker.display());
}
