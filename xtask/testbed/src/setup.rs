//! One-command setup: checks what the build and the testbed need and installs what is
//! missing, idempotently. Present pieces are detected by file checks in milliseconds.

use std::{path::Path, process::Command, time::Instant};

/// bpf-linker release pinned for LLVM 22 (rustc 1.95's LLVM); a newer LLVM in rustc than in
/// bpf-linker fails at link time with "Invalid record".
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "missing: {missing}. This host has no apt-get (not Debian?): install by hand: \
         {hint}, then rerun"
    )]
    NoApt { missing: String, hint: String },
    #[error(
        "missing: {missing}. Installing needs root: rerun as root, or install by hand: {hint}"
    )]
    NotRoot { missing: String, hint: String },
    #[error("`{cmd}` failed ({status}); see its output above")]
    Failed { cmd: String, status: String },
    #[error("cannot run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
}

/// A Debian package and a file whose presence shows it is installed.
struct Package {
    name: &'static str,
    witness: &'static str,
}

const PACKAGES: &[Package] = &[
    Package {
        name: "iproute2",
        witness: "/usr/sbin/ip",
    },
    Package {
        name: "procps",
        witness: "/usr/sbin/sysctl",
    },
    Package {
        name: "mount",
        witness: "/usr/bin/mount",
    },
    Package {
        name: "llvm-22-dev",
        witness: "/usr/lib/llvm-22/bin/llvm-config",
    },
    Package {
        name: "libpolly-22-dev",
        witness: "/usr/lib/llvm-22/lib/cmake/polly/PollyConfig.cmake",
    },
    Package {
        name: "build-essential",
        witness: "/usr/bin/cc",
    },
    Package {
        name: "pkg-config",
        witness: "/usr/bin/pkg-config",
    },
    // `man -l` on the packaged manual page (`cargo xtask dist`'s test).
    Package {
        name: "man-db",
        witness: "/usr/bin/man",
    },
    // A terminal for the live progress display's test (`capture-pane` shows what a person
    // would see).
    Package {
        name: "tmux",
        witness: "/usr/bin/tmux",
    },
];

fn status(cmd: &mut Command) -> Result<(), SetupError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let st = cmd.status().map_err(|source| SetupError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if st.success() {
        Ok(())
    } else {
        Err(SetupError::Failed {
            cmd: shown,
            status: st.to_string(),
        })
    }
}

fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cargo"));
    Path::new(&home).join("bin").join(name)
}

fn bpf_linker_ok() -> bool {
    let bin = cargo_bin("bpf-linker");
    Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("bpf-linker {BPF_LINKER_VERSION}")
        })
        .unwrap_or(false)
}

fn rust_src_ok() -> bool {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .is_some_and(|root| {
            Path::new(&root)
                .join("lib/rustlib/src/rust/library/core/Cargo.toml")
                .exists()
        })
}

fn apt_install(names: &[&str]) -> Result<(), SetupError> {
    let install = || {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(names)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // The package lists may be missing or stale on a fresh host: update once and retry.
    if install().is_err() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        install()?;
    }
    Ok(())
}

/// Ensures everything is installed. `quiet` suppresses the "all present" line.
pub fn ensure(quiet: bool) -> Result<(), SetupError> {
    let started = Instant::now();
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|p| !Path::new(p.witness).exists())
        .map(|p| p.name)
        .collect();
    let linker = bpf_linker_ok();
    let src = rust_src_ok();
    if missing.is_empty() && linker && src {
        if !quiet {
            eprintln!(
                "setup: everything present ({} ms)",
                started.elapsed().as_millis()
            );
        }
        return Ok(());
    }
    if !missing.is_empty() {
        let hint = format!("the Debian packages {}", missing.join(" "));
        let what = missing.join(", ");
        if !Path::new("/usr/bin/apt-get").exists() {
            return Err(SetupError::NoApt {
                missing: what,
                hint,
            });
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SetupError::NotRoot {
                missing: what,
                hint,
            });
        }
        eprintln!("setup: installing {what}");
        apt_install(&missing)?;
    }
    if !src {
        eprintln!("setup: adding the rust-src component (the eBPF crate builds core from source)");
        status(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if !linker {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ])
                // Both are read (llvm-sys and bpf-linker's build); the llvm-config on PATH
                // may be an older LLVM.
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    eprintln!("setup: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
