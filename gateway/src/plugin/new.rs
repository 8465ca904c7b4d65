//! `sluice plugin new NAME --lang rust|python|js [--kind transform|router]`: writes a
//! ready plugin project into the directory `NAME`: the plugin's source on its language's
//! SDK, a copy of the SDK and of the one WIT package (so the project builds on its own,
//! outside this repository), a samples file, a unit test and a README with the commands
//! that build it and run it through `sluice plugin run`. The templates are built into the
//! binary; `{{name}}`, `{{crate}}`, `{{kind}}`, `{{world}}`, `{{method}}` and
//! `{{wit_bindgen}}` are filled in.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::plugin::PluginKind;

/// The WIT package, as the gateway was built with it.
const WIT: &str = include_str!("../../../wit/plugin.wit");
/// The wit-bindgen version the Rust SDK is built with (the workspace's).
const WIT_BINDGEN: &str = "0.61";

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, on the `sluice-sdk` crate.
    Rust,
    /// Python, on the `sluice_plugin` module (componentize-py).
    Python,
    /// JavaScript, on the `sluice` module (componentize-js).
    Js,
}

/// The files of a project: path in the project, content.
fn files(lang: Lang, kind: PluginKind) -> Vec<(&'static str, &'static str)> {
    let transform = kind == PluginKind::Transform;
    match lang {
        Lang::Rust => vec![
            ("Cargo.toml", include_str!("templates/rust/Cargo.toml")),
            (
                "src/lib.rs",
                if transform {
                    include_str!("templates/rust/transform.rs")
                } else {
                    include_str!("templates/rust/router.rs")
                },
            ),
            (
                "sdk/Cargo.toml",
                include_str!("templates/rust/sdk.Cargo.toml"),
            ),
            ("sdk/src/lib.rs", include_str!("../../../sdk/src/lib.rs")),
            (
                "sdk/src/config.rs",
                include_str!("../../../sdk/src/config.rs"),
            ),
            (
                "sdk/src/message.rs",
                include_str!("../../../sdk/src/message.rs"),
            ),
            (
                "sdk/src/state.rs",
                include_str!("../../../sdk/src/state.rs"),
            ),
            ("wit/plugin.wit", WIT),
            (
                "samples.jsonl",
                include_str!("templates/rust/samples.jsonl"),
            ),
            ("README.md", include_str!("templates/rust/README.md")),
        ],
        Lang::Python => vec![
            (
                "app.py",
                if transform {
                    include_str!("templates/python/transform.py")
                } else {
                    include_str!("templates/python/router.py")
                },
            ),
            (
                "test_app.py",
                if transform {
                    include_str!("templates/python/test_transform.py")
                } else {
                    include_str!("templates/python/test_router.py")
                },
            ),
            (
                "sluice_plugin.py",
                include_str!("../../../sdk/python/sluice_plugin.py"),
            ),
            ("wit/plugin.wit", WIT),
            (
                "samples.jsonl",
                include_str!("templates/python/samples.jsonl"),
            ),
            ("README.md", include_str!("templates/python/README.md")),
        ],
        Lang::Js => vec![
            (
                "app.js",
                if transform {
                    include_str!("templates/js/transform.js")
                } else {
                    include_str!("templates/js/router.js")
                },
            ),
            (
                "app.test.js",
                if transform {
                    include_str!("templates/js/transform.test.js")
                } else {
                    include_str!("templates/js/router.test.js")
                },
            ),
            ("sluice.js", include_str!("../../../sdk/js/sluice.js")),
            (
                "testing/register.js",
                include_str!("../../../sdk/js/testing/register.js"),
            ),
            (
                "testing/hooks.js",
                include_str!("../../../sdk/js/testing/hooks.js"),
            ),
            (
                "testing/host.js",
                include_str!("../../../sdk/js/testing/host.js"),
            ),
            ("wit/plugin.wit", include_str!("../../../wit/plugin.wit")),
            ("samples.jsonl", include_str!("templates/js/samples.jsonl")),
            ("README.md", include_str!("templates/js/README.md")),
        ],
    }
}

/// Writes the project `name` (a directory, which must not exist yet) for `lang` and
/// `kind`; returns its directory.
pub fn write(name: &str, lang: Lang, kind: PluginKind) -> anyhow::Result<PathBuf> {
    let base = Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && n.starts_with(|c: char| c.is_ascii_alphabetic())
        })
        .with_context(|| {
            format!("`{name}`: a plugin name starts with a letter and has only letters, digits, `-` and `_`")
        })?;
    let dir = PathBuf::from(name);
    anyhow::ensure!(
        !dir.exists(),
        "{} exists already; choose another name",
        dir.display()
    );
    let crate_name = base.replace('-', "_");
    let (world, method) = match kind {
        PluginKind::Transform => ("transform", "transform"),
        PluginKind::Router => ("router", "route"),
    };
    for (path, template) in files(lang, kind) {
        let text = template
            .replace("{{name}}", base)
            .replace("{{crate}}", &crate_name)
            .replace("{{kind}}", &kind.to_string())
            .replace("{{world}}", world)
            .replace("{{method}}", method)
            .replace("{{wit_bindgen}}", WIT_BINDGEN);
        // The SDK's copy finds the WIT next to it, as in this repository.
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("a parent"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the templates have filled in.
    const PLACEHOLDERS: [&str; 6] = [
        "{{name}}",
        "{{crate}}",
        "{{kind}}",
        "{{world}}",
        "{{method}}",
        "{{wit_bindgen}}",
    ];

    #[test]
    fn every_language_and_kind_writes_its_project() {
        let dir = tempfile::tempdir().unwrap();
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            for kind in [PluginKind::Transform, PluginKind::Router] {
                let name = dir.path().join(format!("p-{lang:?}-{kind}"));
                let written = write(name.to_str().unwrap(), lang, kind).unwrap();
                assert!(written.join("README.md").is_file());
                assert!(written.join("wit/plugin.wit").is_file());
                assert!(written.join("samples.jsonl").is_file());
                let all: String = files(lang, kind)
                    .iter()
                    .map(|(path, _)| std::fs::read_to_string(written.join(path)).unwrap())
                    .collect();
                for placeholder in PLACEHOLDERS {
                    assert!(
                        !all.contains(placeholder),
                        "{lang:?} {kind}: {placeholder} left"
                    );
                }
            }
        }
        assert!(
            write(
                dir.path().join("p-Rust-transform").to_str().unwrap(),
                Lang::Rust,
                PluginKind::Transform
            )
            .is_err(),
            "an existing directory is kept"
        );
        assert!(write("1bad", Lang::Rust, PluginKind::Transform).is_err());
    }
}
