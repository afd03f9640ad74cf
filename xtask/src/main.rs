//! `cargo xtask crdgen`: writes the CRD YAML generated from the Rust API types into
//! `crds/generated/` and `charts/edgeloom/crds/`.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "crdgen" => crdgen(),
        _ => bail!("usage: cargo xtask crdgen"),
    }
}

fn crdgen() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = edgeloom_crds::generated_files().context("serialising CRDs")?;
    for dir in edgeloom_crds::GENERATED_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote {}",
                path.strip_prefix(&root).unwrap_or(&path).display()
            );
        }
    }
    Ok(())
}
