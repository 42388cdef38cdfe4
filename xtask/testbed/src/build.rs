//! Building the `floodclone` binary the runs and tests use.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::setup;

/// The workspace root (this crate lives in `xtask/testbed`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the testbed crate lives in the workspace's xtask/")
        .to_path_buf()
}

/// Runs `cargo ARGS` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// [`cargo`] with these variables set for it.
pub fn cargo_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// The variable through which `cargo xtask test` names the binary it built to the tests
/// ([`floodclone_binary_for_tests`]).
pub const BIN_ENV: &str = "FLOODCLONE_TEST_BIN";

/// The binary the tests run: the one `cargo xtask test` built and named in [`BIN_ENV`],
/// else [`floodclone_binary`] (a plain `cargo test`).
pub fn floodclone_binary_for_tests() -> Result<PathBuf> {
    match std::env::var_os(BIN_ENV) {
        Some(path) => Ok(PathBuf::from(path)),
        None => floodclone_binary(),
    }
}

/// The variable through which `cargo xtask test` names the `quic_copy` it built to the
/// tests ([`quic_copy_binary_for_tests`]).
pub const QUIC_COPY_ENV: &str = "FLOODCLONE_TEST_QUIC_COPY";

/// The `quic_copy` the tests run: the one named in [`QUIC_COPY_ENV`], else
/// [`quic_copy_binary`].
pub fn quic_copy_binary_for_tests() -> Result<PathBuf> {
    match std::env::var_os(QUIC_COPY_ENV) {
        Some(path) => Ok(PathBuf::from(path)),
        None => quic_copy_binary(),
    }
}

/// The cargo profile of the binaries runs, benches, tests and packages use (the workspace's
/// `Cargo.toml` says why it is not plain `release`).
pub const PROFILE: &str = "release-lto";

/// The [`PROFILE`] build of the example `quic_copy` (a bare QUIC copy with a node's
/// transport, the bench's `--quic-runs`); returns its path.
pub fn quic_copy_binary() -> Result<PathBuf> {
    build_in_profile(&["--example", "quic_copy"], "examples/quic_copy")
}

/// Setup, then the [`PROFILE`] build of the `floodclone` binary; returns its path.
pub fn floodclone_binary() -> Result<PathBuf> {
    setup::ensure(true)?;
    build_in_profile(&["--bin", "floodclone"], "floodclone")
}

/// Builds `target` (`--bin NAME`, `--example NAME`) of floodclone-user with [`PROFILE`], so
/// the daemon and the bare copy it is compared with are built alike; returns `built`, its
/// path under the profile's directory.
fn build_in_profile(target: &[&str], built: &str) -> Result<PathBuf> {
    let mut args = vec!["build", "--profile", PROFILE, "-p", "floodclone-user"];
    args.extend_from_slice(target);
    cargo(&args)?;
    let path = target_dir().join(PROFILE).join(built);
    if !path.is_file() {
        bail!(
            "cargo built {} but {} is missing",
            target.join(" "),
            path.display()
        );
    }
    Ok(path)
}

/// Where cargo puts what it builds.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
