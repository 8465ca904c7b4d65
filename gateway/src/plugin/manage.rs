//! Versions an operator manages through the admin API: uploads (validated before they
//! serve), activations (which outlive restarts), and deletions.

use std::sync::Arc;

use crate::plugin::versions::Versions;
use crate::plugin::{LoadedPlugin, PluginError, PluginSet, Plugins, Source, host, versions};

/// Why an admin request about plugins failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No active plugin has that name.
    #[error("no plugin `{0}` is configured")]
    UnknownPlugin(String),
    /// No stored version has that hash.
    #[error("plugin `{name}` has no uploaded version {hash}")]
    UnknownVersion {
        /// The plugin.
        name: String,
        /// The hash asked for.
        hash: String,
    },
    /// The name cannot be a folder name.
    #[error("plugin `{0}` cannot take uploads: its name must be letters, digits, `-`, `_` and `.`")]
    UnusableName(String),
    /// This host keeps no versions.
    #[error("this gateway keeps no uploaded versions")]
    NoStore,
    /// The version serves now; activate another one first.
    #[error(
        "version {hash} of plugin `{name}` is active: activate another version (or the \
         configured file) first"
    )]
    Active {
        /// The plugin.
        name: String,
        /// The version.
        hash: String,
    },
    /// A configuration reload changed the plugin while the version was checked; nothing
    /// changed (try again).
    #[error("the configuration of plugin `{0}` changed while this version was checked; try again")]
    Changed(String),
    /// The version failed validation; nothing changed.
    #[error(transparent)]
    Invalid(#[from] PluginError),
    /// Writing the version or the activation failed.
    #[error("cannot store the plugin version: {0}")]
    Storage(#[from] std::io::Error),
}

/// A version as the admin API reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionReport {
    /// The plugin.
    pub plugin: String,
    /// Transform or router.
    pub kind: String,
    /// SHA-256 of the component.
    pub hash: String,
    /// Whether it serves now.
    pub active: bool,
}

impl Plugins {
    /// Stores `bytes` as a new version of plugin `name` after validating it (it compiles,
    /// imports only what plugins may, is of the plugin's kind, and its `init` accepts the
    /// plugin's configuration); with `activate`, it then serves in place of the current
    /// version, which finishes the batches it started. Nothing changes if it is refused.
    pub fn upload(
        &self,
        name: &str,
        bytes: &[u8],
        activate: bool,
    ) -> Result<VersionReport, AdminError> {
        let versions = self.inner.versions.as_ref().ok_or(AdminError::NoStore)?;
        if !versions::usable_name(name) {
            return Err(AdminError::UnusableName(name.to_string()));
        }
        let current = self.current();
        let plugin = current
            .find(name)
            .ok_or_else(|| AdminError::UnknownPlugin(name.to_string()))?;
        let hash = host::content_hash(bytes);
        let _uploading = self
            .inner
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (file, new) = versions.store(name, &hash, bytes)?;
        let loaded = match self.load(&plugin.entry, plugin.kind, &file, Source::Uploaded) {
            Ok(loaded) => loaded,
            Err(error) => {
                if new {
                    let _ = std::fs::remove_file(&file);
                }
                return Err(error.into());
            }
        };
        tracing::info!(plugin = %name, hash = %&hash[..12], "plugin version uploaded");
        if activate {
            self.swap_in(loaded, versions)?;
        }
        Ok(VersionReport {
            plugin: name.to_string(),
            kind: plugin.kind.to_string(),
            hash,
            active: activate,
        })
    }

    /// Makes the uploaded version `hash` of plugin `name` serve, or with `None` its
    /// configured file again; validated like an upload first.
    pub fn activate(&self, name: &str, hash: Option<&str>) -> Result<VersionReport, AdminError> {
        let versions = self.inner.versions.as_ref().ok_or(AdminError::NoStore)?;
        // Held from loading to swapping: a file reload in between would otherwise be
        // overwritten by what was loaded before it.
        let changing = self.lock_changes();
        let current = self.current();
        let plugin = current
            .find(name)
            .ok_or_else(|| AdminError::UnknownPlugin(name.to_string()))?;
        let (file, source) = match hash {
            Some(hash) => {
                let file = versions.file(name, hash);
                if !versions::usable_name(name)
                    || !hash.chars().all(|c| c.is_ascii_hexdigit())
                    || !file.is_file()
                {
                    return Err(AdminError::UnknownVersion {
                        name: name.to_string(),
                        hash: hash.to_string(),
                    });
                }
                (file, Source::Uploaded)
            }
            None => (plugin.entry.path.clone(), Source::Configured),
        };
        let loaded = self.load(&plugin.entry, plugin.kind, &file, source)?;
        let report = VersionReport {
            plugin: name.to_string(),
            kind: plugin.kind.to_string(),
            hash: loaded.hash.clone(),
            active: true,
        };
        self.swap_in_locked(&changing, loaded, versions)?;
        Ok(report)
    }

    /// Puts `loaded` in place of the plugin of the same name and records the activation.
    fn swap_in(&self, loaded: Arc<LoadedPlugin>, versions: &Versions) -> Result<(), AdminError> {
        let changing = self.lock_changes();
        self.swap_in_locked(&changing, loaded, versions)
    }

    /// [`Plugins::swap_in`] with the change lock already held.
    fn swap_in_locked(
        &self,
        _changing: &std::sync::MutexGuard<'_, ()>,
        loaded: Arc<LoadedPlugin>,
        versions: &Versions,
    ) -> Result<(), AdminError> {
        let current = self.current();
        let mut next = PluginSet {
            transforms: current.transforms.clone(),
            router: current.router.clone(),
        };
        let Some(slot) = next.slots().find(|slot| slot.name == loaded.name) else {
            return Err(AdminError::UnknownPlugin(loaded.name.clone()));
        };
        if slot.entry != loaded.entry {
            return Err(AdminError::Changed(loaded.name.clone()));
        }
        let activation = (loaded.source == Source::Uploaded).then(|| versions::Activation {
            hash: loaded.hash.clone(),
            configured: loaded.entry.path.clone(),
        });
        versions.set_activation(&loaded.name, activation)?;
        tracing::info!(plugin = %loaded.name, old = %&slot.hash[..12], new = %&loaded.hash[..12], source = ?loaded.source, "plugin version activated");
        *slot = loaded;
        self.install(next);
        Ok(())
    }

    /// Deletes the uploaded version `hash` of plugin `name`; the version serving now (or
    /// recorded as active) cannot be deleted.
    pub fn delete_version(&self, name: &str, hash: &str) -> Result<(), AdminError> {
        let versions = self.inner.versions.as_ref().ok_or(AdminError::NoStore)?;
        let _changing = self.lock_changes();
        let unknown = || AdminError::UnknownVersion {
            name: name.to_string(),
            hash: hash.to_string(),
        };
        if !versions::usable_name(name) || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        let serving = self
            .current()
            .find(name)
            .is_some_and(|plugin| plugin.source == Source::Uploaded && plugin.hash == hash);
        let recorded = versions
            .activations()
            .get(name)
            .is_some_and(|active| active.hash == hash);
        if serving || recorded {
            return Err(AdminError::Active {
                name: name.to_string(),
                hash: hash.to_string(),
            });
        }
        match std::fs::remove_file(versions.file(name, hash)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(unknown()),
            Err(error) => Err(error.into()),
        }
    }

    /// The uploaded versions of plugin `name`.
    pub fn stored_versions(&self, name: &str) -> Vec<versions::StoredVersion> {
        match &self.inner.versions {
            Some(versions) if versions::usable_name(name) => versions.list(name),
            _ => Vec::new(),
        }
    }
}
