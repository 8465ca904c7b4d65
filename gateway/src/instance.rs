//! Which instance of the fleet's gateways this process is.
//!
//! Several instances behind one load balancer share a configuration, and the broker keeps
//! one connection per MQTT client id: the gateway's own connections at IoT Core must carry
//! a name no other instance uses. That name is the instance id: `server.instance_id` (or
//! `sluice run --instance-id`) when the operator gives one, otherwise an id made at the
//! first start and kept in the data directory, so that an instance restarted on its volume
//! is the same instance again.

use std::path::Path;

use anyhow::Context as _;

/// The file in the data directory that keeps a made-up instance id.
pub const FILE: &str = "instance-id";

/// The placeholder in `sinks.iot_core.mqtt.client_id` that stands for the instance id.
pub const PLACEHOLDER: &str = "${instance.id}";

/// Characters a made-up instance id has (hex, from 48 random bits).
const MADE_UP_LEN: usize = 12;

/// Whether `id` may name an instance: 1 to 64 characters of `A-Z a-z 0-9 _ -` (it ends
/// up in MQTT client ids, IoT policy resources and metric labels).
pub fn valid(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The instance id: `configured`, or the one kept in `data_dir` (made and kept there at
/// the first start).
pub fn resolve(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(kept) => {
            let kept = kept.trim();
            anyhow::ensure!(
                valid(kept),
                "{} does not hold an instance id (1 to 64 characters of A-Z a-z 0-9 _ -); \
                 remove it to have a new one made, or set server.instance_id",
                path.display()
            );
            Ok(kept.to_string())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id: String = (0..MADE_UP_LEN / 2)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            // Written aside and renamed into place: a crash leaves the file whole or absent.
            let aside = data_dir.join(format!("{FILE}.new"));
            std::fs::write(&aside, format!("{id}\n"))
                .and_then(|()| std::fs::File::open(&aside)?.sync_all())
                .and_then(|()| std::fs::rename(&aside, &path))
                .with_context(|| format!("cannot keep the instance id in {}", path.display()))?;
            Ok(id)
        }
        Err(error) => Err(error)
            .with_context(|| format!("cannot read the instance id from {}", path.display())),
    }
}

/// `template` with the instance id in place of [`PLACEHOLDER`].
pub fn fill(template: &str, instance: &str) -> String {
    template.replace(PLACEHOLDER, instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_up_id_is_kept_and_a_configured_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let first = resolve(None, dir.path()).unwrap();
        assert!(valid(&first) && first.len() == MADE_UP_LEN, "{first}");
        assert_eq!(resolve(None, dir.path()).unwrap(), first);
        assert_eq!(resolve(Some("edge-a"), dir.path()).unwrap(), "edge-a");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(resolve(None, other.path()).unwrap(), first);
    }

    #[test]
    fn a_damaged_id_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "not/an id").unwrap();
        let error = resolve(None, dir.path()).unwrap_err().to_string();
        assert!(error.contains("instance-id"), "{error}");
    }

    #[test]
    fn ids_are_checked_and_filled_in() {
        assert!(valid("edge-a_1"));
        assert!(!valid(""));
        assert!(!valid("a/b"));
        assert!(!valid(&"a".repeat(65)));
        assert_eq!(
            fill("sluice-gateway-${instance.id}", "edge-a"),
            "sluice-gateway-edge-a"
        );
    }
}
