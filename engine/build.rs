//! Bundles the browser code of the built-in pages into the binary, so that the server
//! needs no network at run time: the `phoenix` npm client for the demo page (`GET /`) and
//! uPlot for the admin page's charts (`GET /admin`). Both come from `assets/` (pinned by
//! its lockfile), installed with `npm ci` on first build when npm is available.

use std::path::Path;
use std::process::Command;

/// (file under assets/node_modules, name in OUT_DIR, what the page says without it)
const BUNDLED: [(&str, &str, &str); 3] = [
    (
        "phoenix/priv/static/phoenix.min.js",
        "phoenix.min.js",
        "document.body.textContent='The phoenix client was not bundled: run npm ci in engine/assets and rebuild.';",
    ),
    (
        "uplot/dist/uPlot.iife.min.js",
        "uplot.min.js",
        "window.uPlotMissing='uPlot was not bundled: run npm ci in engine/assets and rebuild.';",
    ),
    ("uplot/dist/uPlot.min.css", "uplot.min.css", "/* uPlot was not bundled */"),
];

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let assets = Path::new(&manifest).join("assets");
    let modules = assets.join("node_modules");
    println!("cargo:rerun-if-changed=assets/package-lock.json");
    for (file, _, _) in BUNDLED {
        println!("cargo:rerun-if-changed={}", modules.join(file).display());
    }
    if BUNDLED.iter().any(|(file, _, _)| !modules.join(file).exists()) {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&assets)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            println!("cargo:warning=npm ci in engine/assets failed: the demo and admin pages will say what is missing");
        }
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    for (file, name, missing) in BUNDLED {
        let bytes = std::fs::read(modules.join(file)).unwrap_or_else(|_| missing.as_bytes().to_vec());
        std::fs::write(Path::new(&out).join(name), bytes).expect("write a bundled asset");
    }
}
