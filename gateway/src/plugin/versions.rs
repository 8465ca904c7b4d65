//! Plugin versions uploaded through the admin API, kept in the data directory:
//! `plugins/<name>/<sha256>.wasm`, plus `plugins/active.json`, which names the uploaded
//! version serving in place of each plugin's configured file.
//!
//! An activation outlives restarts, and ends when the operator activates the configured
//! file again or points the plugin's `path` at another file in the configuration (the
//! activation remembers which configured file it replaced).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An uploaded version serving in place of a configured file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// The version's content hash.
    pub hash: String,
    /// The configured file it replaces.
    pub configured: PathBuf,
}

/// One stored version.
#[derive(Debug, Clone, Serialize)]
pub struct StoredVersion {
    /// SHA-256 of the component, hex.
    pub hash: String,
    /// Its size.
    pub bytes: u64,
    /// When it was uploaded (file time), ms since the epoch.
    pub uploaded_at_ms: u64,
}

/// The folder of uploaded versions.
#[derive(Debug, Clone)]
pub struct Versions {
    dir: PathBuf,
}

/// Whether `name` can name a folder: uploads are refused for other plugin names.
pub fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name != "active.json"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Versions {
    /// The store in `dir` (created on the first upload).
    pub fn new(dir: PathBuf) -> Versions {
        Versions { dir }
    }

    /// The file of version `hash` of plugin `name`.
    pub fn file(&self, name: &str, hash: &str) -> PathBuf {
        self.dir.join(name).join(format!("{hash}.wasm"))
    }

    /// Stores `bytes` as version `hash` of `name` (written to a temporary file, synced,
    /// then renamed, so a crash never leaves half a component under a version's name).
    /// Returns the file and whether it was new.
    pub fn store(&self, name: &str, hash: &str, bytes: &[u8]) -> std::io::Result<(PathBuf, bool)> {
        let file = self.file(name, hash);
        if file.is_file() {
            return Ok((file, false));
        }
        let folder = self.dir.join(name);
        std::fs::create_dir_all(&folder)?;
        let mut temporary = tempfile::NamedTempFile::new_in(&folder)?;
        temporary.write_all(bytes)?;
        temporary.as_file().sync_all()?;
        temporary.persist(&file).map_err(|e| e.error)?;
        Ok((file, true))
    }

    /// The stored versions of `name`, oldest first.
    pub fn list(&self, name: &str) -> Vec<StoredVersion> {
        let Ok(entries) = std::fs::read_dir(self.dir.join(name)) else {
            return Vec::new();
        };
        let mut versions: Vec<StoredVersion> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let path = entry.path();
                let hash = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".wasm")?
                    .to_string();
                let meta = entry.metadata().ok()?;
                let uploaded_at_ms = meta
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_millis() as u64;
                Some(StoredVersion {
                    hash,
                    bytes: meta.len(),
                    uploaded_at_ms,
                })
            })
            .collect();
        versions.sort_by(|a, b| (a.uploaded_at_ms, &a.hash).cmp(&(b.uploaded_at_ms, &b.hash)));
        versions
    }

    fn activations_file(&self) -> PathBuf {
        self.dir.join("active.json")
    }

    /// The activations by plugin name; none if the file is missing or unreadable (which
    /// is logged: the configured files serve then).
    pub fn activations(&self) -> BTreeMap<String, Activation> {
        let path = self.activations_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::error!(file = %path.display(), %error, "cannot read the plugin activations; the configured files serve");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        }
    }

    /// Records (or, with `None`, ends) the activation for `name`.
    pub fn set_activation(
        &self,
        name: &str,
        activation: Option<Activation>,
    ) -> std::io::Result<()> {
        let mut all = self.activations();
        match activation {
            Some(activation) => {
                all.insert(name.to_string(), activation);
            }
            None => {
                if all.remove(name).is_none() {
                    return Ok(());
                }
            }
        }
        std::fs::create_dir_all(&self.dir)?;
        let mut temporary = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer_pretty(&mut temporary, &all)?;
        temporary.as_file().sync_all()?;
        temporary
            .persist(self.activations_file())
            .map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_survive_a_new_store_and_end_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let versions = Versions::new(dir.path().join("plugins"));
        assert!(versions.activations().is_empty());
        let (file, new) = versions.store("enricher", "abc", b"component").unwrap();
        assert!(new);
        assert_eq!(std::fs::read(&file).unwrap(), b"component");
        assert!(!versions.store("enricher", "abc", b"component").unwrap().1);
        let activation = Activation {
            hash: "abc".into(),
            configured: "plugins/enricher.wasm".into(),
        };
        versions
            .set_activation("enricher", Some(activation.clone()))
            .unwrap();
        let again = Versions::new(dir.path().join("plugins"));
        assert_eq!(again.activations().get("enricher"), Some(&activation));
        assert_eq!(again.list("enricher").len(), 1);
        again.set_activation("enricher", None).unwrap();
        assert!(
            Versions::new(dir.path().join("plugins"))
                .activations()
                .is_empty()
        );
    }

    #[test]
    fn only_plain_names_get_folders() {
        assert!(usable_name("json-enricher_2.v1"));
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "naïve", "active.json"] {
            assert!(!usable_name(bad), "{bad}");
        }
    }
}
