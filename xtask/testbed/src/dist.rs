//! `cargo xtask dist`: a Debian package of the `floodclone` binary, its systemd units, its
//! manual page and its shell completions, installable on a Debian host with no Rust.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{build::workspace_root, netns::run};

/// Where the binary goes in the package; the shipped units (written for a hand install at
/// `/usr/local/bin`) are rewritten to run it from here.
const BIN_PATH: &str = "usr/bin/floodclone";
const HAND_INSTALLED: &str = "/usr/local/bin/floodclone";
const UNITS: [&str; 2] = ["floodclone-send.service", "floodclone-recv.service"];

/// Builds `floodclone_<version>_<arch>.deb` in `out_dir` from the binary `bin`; returns its
/// path.
pub fn build_deb(bin: &Path, out_dir: &Path) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = run(Command::new("dpkg").arg("--print-architecture"), None)
        .context("dpkg --print-architecture (dpkg-deb is needed to build the package)")?
        .trim()
        .to_string();
    let name = format!("floodclone_{version}_{arch}");
    let stage = out_dir.join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    let put = |rel: &str, body: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join(rel);
        std::fs::create_dir_all(path.parent().expect("a path in the package"))?;
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    // The binary without its debug info (the release profile keeps it for profiling: 70 MB).
    let packaged_bin = stage.join(BIN_PATH);
    std::fs::create_dir_all(packaged_bin.parent().expect("usr/bin"))?;
    run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(bin)
            .arg(&packaged_bin),
        None,
    )
    .context("objcopy (binutils) stripping the binary's debug info")?;
    let generated = |args: &[&str]| -> Result<Vec<u8>> {
        Ok(run(Command::new(bin).args(args), None)?.into_bytes())
    };
    put(
        "usr/share/man/man1/floodclone.1.gz",
        &gzip(&generated(&["man"])?)?,
        0o644,
    )?;
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/floodclone"),
        ("zsh", "usr/share/zsh/vendor-completions/_floodclone"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/floodclone.fish",
        ),
    ] {
        put(rel, &generated(&["completions", shell])?, 0o644)?;
    }
    let root = workspace_root();
    for unit in UNITS {
        let text = std::fs::read_to_string(root.join("deploy").join(unit))?;
        put(
            &format!("lib/systemd/system/{unit}"),
            packaged_unit(&text).as_bytes(),
            0o644,
        )?;
    }
    put(
        "usr/share/doc/floodclone/copyright",
        copyright(&root)?.as_bytes(),
        0o644,
    )?;
    let depends = glibc_needed(&packaged_bin)?
        .map(|v| format!("Depends: libc6 (>= {v})\n"))
        .unwrap_or_default();
    let installed_kib = dir_bytes(&stage)? / 1024;
    put(
        "DEBIAN/control",
        control(version, &arch, &depends, installed_kib).as_bytes(),
        0o644,
    )?;
    // Units installed or replaced: systemd reads them again (where systemd runs).
    put(
        "DEBIAN/postinst",
        b"#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then\n    \
          systemctl daemon-reload || true\nfi\n",
        0o755,
    )?;
    let deb = out_dir.join(format!("{name}.deb"));
    run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
        None,
    )
    .context("dpkg-deb building the package")?;
    std::fs::remove_dir_all(&stage)?;
    Ok(deb)
}

/// A shipped unit as the package installs it: running the packaged binary, without the
/// comment lines that install the binary and the unit by hand (the package did).
fn packaged_unit(text: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| !l.starts_with("#   install "))
        .map(|l| l.replace(HAND_INSTALLED, &format!("/{BIN_PATH}")) + "\n")
        .collect();
    out = out.replace("systemctl daemon-reload && ", "");
    out
}

/// The package's `copyright` file: both licenses, whole.
fn copyright(root: &Path) -> Result<String> {
    let mut text = String::from(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: floodclone\n\nFiles: *\nLicense: MIT or Apache-2.0\n\n",
    );
    for license in ["LICENSE-MIT", "LICENSE-APACHE"] {
        text += &std::fs::read_to_string(root.join(license))?;
        text.push('\n');
    }
    Ok(text)
}

/// `DEBIAN/control`; `depends` is a whole `Depends:` line or empty.
fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: floodclone\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: FloodClone developers <floodclone@localhost>\n{depends}\
         Installed-Size: {installed_kib}\nSection: net\nPriority: optional\n\
         Description: deliver one file to many hosts at the network's min-cut\n \
         A source serves a file; every destination fetches it over QUIC and passes on\n \
         each verified chunk at once, on every link, so the swarm finishes near the\n \
         floor that the network's max-flow sets. Needs Linux with BPF (CAP_BPF,\n \
         CAP_NET_ADMIN, CAP_PERFMON) for its in-kernel link statistics.\n"
    )
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    child.stdin.take().expect("piped").write_all(data)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

/// The newest glibc symbol version the binary links against (`GLIBC_2.34` -> "2.34"): the
/// package's `libc6` dependency.
fn glibc_needed(bin: &Path) -> Result<Option<String>> {
    let text = run(Command::new("objdump").arg("-T").arg(bin), None)
        .context("objdump -T (binutils) on the binary")?;
    Ok(newest_glibc(&text))
}

/// The newest `GLIBC_x.y[.z]` version named in `objdump -T` output.
fn newest_glibc(objdump: &str) -> Option<String> {
    let parse = |v: &str| -> Option<Vec<u32>> { v.split('.').map(|p| p.parse().ok()).collect() };
    objdump
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| parse(v).map(|n| (n, v.to_string())))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_glibc_version_is_numeric_not_textual() {
        let dump = "0000 DF *UND* 0 (GLIBC_2.9) a\n0000 DF *UND* 0 (GLIBC_2.34) b\n\
                    0000 DF *UND* 0 GLIBC_2.2.5 c\n0000 DF *UND* 0 (GLIBC_PRIVATE) d\n";
        assert_eq!(newest_glibc(dump).as_deref(), Some("2.34"));
        assert_eq!(newest_glibc("no versions here"), None);
    }

    #[test]
    fn a_packaged_unit_runs_the_packaged_binary_and_drops_the_hand_install() {
        let root = workspace_root().join("deploy");
        for unit in UNITS {
            let text = packaged_unit(&std::fs::read_to_string(root.join(unit)).unwrap());
            assert!(text.contains("ExecStart=/usr/bin/floodclone "), "{text}");
            assert!(!text.contains("/usr/local/bin") && !text.contains("#   install "));
            assert!(!text.contains("daemon-reload"), "{text}");
        }
    }
}
