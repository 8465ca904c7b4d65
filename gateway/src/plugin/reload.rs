//! Hot reload: watches the plugin files and swaps in a new version when one changes.
//!
//! The folders holding the plugin files are watched (not the files), so both ways of
//! replacing a file work: writing it in place and renaming a new file over it. A file
//! caught half-written fails to load; the old version keeps serving, and the next
//! change event (the end of the write) loads it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};

use crate::plugin::Plugins;

/// Keeps the watch alive; dropping it stops watching.
pub struct ReloadWatcher {
    /// The OS watch; events stop when it is dropped.
    _watcher: notify::RecommendedWatcher,
    /// The thread that reloads plugins; it ends when the watcher's channel closes.
    _thread: std::thread::JoinHandle<()>,
}

/// Starts watching the plugins' files.
pub fn watch(plugins: Plugins) -> anyhow::Result<ReloadWatcher> {
    let paths: Vec<PathBuf> = plugins.paths().iter().map(|p| absolute(p)).collect();
    let (events, changes) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(events)?;
    let folders: BTreeSet<PathBuf> = paths
        .iter()
        .filter_map(|path| path.parent().map(Path::to_path_buf))
        .collect();
    for folder in &folders {
        watcher.watch(folder, RecursiveMode::NonRecursive)?;
    }
    let thread = std::thread::Builder::new().name("sluice-reload".to_string()).spawn(move || {
        while let Ok(event) = changes.recv() {
            let Ok(event) = event else { continue };
            if event.kind.is_access() {
                continue;
            }
            for changed in event.paths.iter().map(|p| absolute(p)) {
                if !paths.contains(&changed) {
                    continue;
                }
                match plugins.reload(&changed) {
                    Ok(names) if names.is_empty() => {}
                    Ok(names) => tracing::info!(plugins = ?names, file = %changed.display(), "hot reload done"),
                    Err(error) => tracing::warn!(%error, file = %changed.display(), "hot reload failed; the previous version keeps serving"),
                }
            }
        }
    })?;
    Ok(ReloadWatcher {
        _watcher: watcher,
        _thread: thread,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
