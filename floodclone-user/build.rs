//! Builds the tc programs in `floodclone-ebpf` for the BPF target and leaves the object in
//! OUT_DIR, where `src/linkstats.rs` embeds it with `include_bytes!`.
//!
//! Why here and not in xtask: a plain `cargo build`/`cargo test` then always embeds the object
//! built from the current source, so no stale or missing object can be shipped.

fn main() -> anyhow::Result<()> {
    // The eBPF crate needs `-Z build-std=core`. Stable rustc allows that under RUSTC_BOOTSTRAP,
    // which aya-build reads from this process's environment and passes only to its nested
    // cargo: the host crates stay on plain stable.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // Build with the toolchain that builds us (rustup sets RUSTUP_TOOLCHAIN for its proxies).
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../floodclone-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "floodclone-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             run `cargo xtask setup` (installs bpf-linker, rust-src and LLVM 22) and retry"
        )
    })
}
