//! Locating the Go-built binaries that e2e/scripts/install-tools.sh puts in the cache.

use std::path::PathBuf;

/// Where the binaries are: `$EDGELOOM_BIN_DIR`, else `${EDGELOOM_CACHE:-~/.cache/edgeloom}/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGELOOM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    cache_dir().join("bin")
}

/// The cache directory shared by the project's install scripts.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGELOOM_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("edgeloom")
}

/// A missing tool binary.
#[derive(Debug, thiserror::Error)]
#[error("{name} not found at {path}: run e2e/scripts/install-tools.sh (or set EDGELOOM_BIN_DIR)")]
pub struct MissingTool {
    /// The binary's name.
    pub name: String,
    /// Where it was looked for.
    pub path: PathBuf,
}

/// The path of tool `name`, checked to exist.
pub fn tool(name: &str) -> Result<PathBuf, MissingTool> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingTool {
            name: name.to_string(),
            path,
        })
    }
}
