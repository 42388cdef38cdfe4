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
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Setup, then the release `floodclone` binary; returns its path.
pub fn floodclone_binary() -> Result<PathBuf> {
    setup::ensure(true)?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "floodclone-user",
        "--bin",
        "floodclone",
    ])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release").join("floodclone"))
}
