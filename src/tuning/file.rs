//! The tuning cache's file: where it lives and how it is read and written
//! (the edge of the house that touches the file system; not on the web).

use std::path::PathBuf;

use super::{CACHE_DIR_ENV, TuningCache};
use crate::error::{Error, Result};

const CACHE_FILE: &str = "tuning.json";

/// The folder of the tuning cache: `WGPU_BATCHNORM_CACHE_DIR`, else the
/// platform's cache folder (`$XDG_CACHE_HOME` or `~/.cache` on Linux,
/// `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows) with
/// `wgpu-batchnorm` below it. `None` where none is known.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env(CACHE_DIR_ENV) {
        return Some(dir);
    }
    // three well-known variables: not worth a dependency
    let base = if cfg!(windows) {
        env("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|h| h.join("Library/Caches"))
    } else {
        env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))
    };
    base.map(|b| b.join("wgpu-batchnorm"))
}

/// The tuning cache's file, in [`cache_dir`].
pub fn cache_path() -> Option<PathBuf> {
    cache_dir().map(|d| d.join(CACHE_FILE))
}

fn file_error(path: &std::path::Path, message: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl TuningCache {
    /// Reads the cache file. A missing file is an empty cache; an unreadable
    /// or corrupt one is an error (the command-line tool turns it into a
    /// warning).
    pub fn load() -> Result<Self> {
        let Some(path) = cache_path() else {
            return Ok(TuningCache::default());
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TuningCache::default()),
            Err(e) => return Err(file_error(&path, e)),
        };
        TuningCache::from_json(&text).map_err(|e| file_error(&path, e))
    }

    /// Writes the cache file (creating its folder), replacing it whole.
    pub fn save(&self) -> Result<PathBuf> {
        let path = cache_path()
            .ok_or_else(|| Error::kernels("tuning cache", format!("no cache folder: set {CACHE_DIR_ENV} or HOME")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        }
        let text = self.to_json();
        // write then rename: a reader never sees half a file
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| file_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| file_error(&path, e))?;
        Ok(path)
    }
}
