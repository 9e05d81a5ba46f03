//! Bundles the `phoenix` npm client into the binary for the demo page (`GET /`), so the
//! server needs no network at run time. The client comes from `assets/` (pinned by its
//! lockfile), installed with `npm ci` on first build when npm is available.

use std::path::Path;
use std::process::Command;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let assets = Path::new(&manifest).join("assets");
    let client = assets.join("node_modules/phoenix/priv/static/phoenix.min.js");
    println!("cargo:rerun-if-changed=assets/package-lock.json");
    println!("cargo:rerun-if-changed={}", client.display());
    if !client.exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&assets)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            println!(
                "cargo:warning=npm ci in engine/assets failed: the demo page will say its client is missing"
            );
        }
    }
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("phoenix.min.js");
    let js = std::fs::read(&client).unwrap_or_else(|_| {
        b"document.body.textContent='The phoenix client was not bundled: run npm ci in engine/assets and rebuild.';"
            .to_vec()
    });
    std::fs::write(out, js).expect("write the bundled client");
}
