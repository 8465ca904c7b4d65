//! Hot reload: watches the plugin files and swaps in a new version when one changes.
//!
//! The folders holding the plugin files are watched (not the files), so both ways of
//! replacing a file work: writing it in place and renaming a new file over it. A file
//! caught half-written fails to load; the old version keeps serving, and the next
//! change event (the end of the write) loads it. Which files matter is read from the
//! active set at each event, so a configuration reload that changes the plugins is
//! followed; [`ReloadWatcher::follow`] adds the folders of new files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use notify::{RecursiveMode, Watcher};

use crate::plugin::{Plugins, absolute};

/// Keeps the watch alive; dropping it stops watching.
pub struct ReloadWatcher {
    /// The OS watch; events stop when it is dropped.
    watcher: Mutex<(notify::RecommendedWatcher, BTreeSet<PathBuf>)>,
    plugins: Plugins,
    /// The thread that reloads plugins; it ends when the watcher's channel closes.
    _thread: std::thread::JoinHandle<()>,
}

/// Starts watching the plugins' files.
pub fn watch(plugins: Plugins) -> anyhow::Result<ReloadWatcher> {
    let (events, changes) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let watcher = notify::recommended_watcher(events)?;
    let thread = {
        let plugins = plugins.clone();
        std::thread::Builder::new().name("sluice-reload".to_string()).spawn(move || {
            while let Ok(event) = changes.recv() {
                let Ok(event) = event else { continue };
                if event.kind.is_access() {
                    continue;
                }
                let watched: Vec<PathBuf> = plugins.paths().iter().map(|p| absolute(p)).collect();
                for changed in event.paths.iter().map(|p| absolute(p)) {
                    if !watched.contains(&changed) {
                        continue;
                    }
                    match plugins.reload(&changed) {
                        Ok(names) if names.is_empty() => {}
                        Ok(names) => tracing::info!(plugins = ?names, file = %changed.display(), "hot reload done"),
                        Err(error) => tracing::warn!(%error, file = %changed.display(), "hot reload failed; the previous version keeps serving"),
                    }
                }
            }
        })?
    };
    let watcher = ReloadWatcher {
        watcher: Mutex::new((watcher, BTreeSet::new())),
        plugins,
        _thread: thread,
    };
    watcher.follow()?;
    Ok(watcher)
}

impl ReloadWatcher {
    /// Watches the folders of the active plugins' files that are not watched yet.
    pub fn follow(&self) -> anyhow::Result<()> {
        let mut guard = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        let (watcher, folders) = &mut *guard;
        for path in self.plugins.paths() {
            let Some(folder) = absolute(&path).parent().map(Path::to_path_buf) else {
                continue;
            };
            if folders.contains(&folder) {
                continue;
            }
            watcher.watch(&folder, RecursiveMode::NonRecursive)?;
            folders.insert(folder);
        }
        Ok(())
    }
}
