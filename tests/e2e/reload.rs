//! Hot reload of a plugin file while requests flow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::{Gateway, eventually, plugin};

#[test]
fn replacing_a_plugin_file_reloads_it_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("plugins").join("hot.wasm");
    std::fs::create_dir_all(live.parent().unwrap()).unwrap();
    std::fs::copy(plugin("passthrough"), &live).unwrap();
    let config = format!(
        "[plugins]\nworkers = 2\n[[plugins.transform]]\nname = \"hot\"\npath = \"{}\"\n",
        live.display()
    );
    let gateway = Arc::new(Gateway::start_in(
        dir,
        &config,
        reqwest::blocking::Client::new(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let posters: Vec<_> = (0..2)
        .map(|poster| {
            let (gateway, stop, sent) = (gateway.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let reply =
                        gateway.publish("t", &format!("dev-{poster}"), format!(r#"{{"n": {n}}}"#));
                    replies.push((
                        reply.status,
                        reply.body["id"].as_str().unwrap_or_default().to_string(),
                    ));
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                replies
            })
        })
        .collect();

    eventually(Duration::from_secs(30), "traffic before the reload", || {
        (sent.load(Ordering::Relaxed) >= 50).then_some(())
    });
    assert!(
        gateway
            .all_sink_lines()
            .iter()
            .all(|line| line["payload"].get("device_id").is_none()),
        "passthrough does not enrich"
    );
    // Replace the file the way deployment tools do: write beside it, rename over it.
    let staged = live.with_extension("staged");
    std::fs::copy(plugin("json_enricher"), &staged).unwrap();
    std::fs::rename(&staged, &live).unwrap();

    eventually(
        Duration::from_secs(30),
        "an enriched message after the reload",
        || {
            gateway
                .all_sink_lines()
                .iter()
                .any(|line| line["payload"].get("device_id").is_some())
                .then_some(())
        },
    );
    let after_reload = sent.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "traffic after the reload", || {
        (sent.load(Ordering::Relaxed) >= after_reload + 50).then_some(())
    });
    stop.store(true, Ordering::Relaxed);

    let replies: Vec<(u16, String)> = posters
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    let failed: Vec<_> = replies
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        replies.len()
    );
    let stored: std::collections::HashSet<String> = gateway
        .all_sink_lines()
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_string())
        .collect();
    let missing = replies
        .iter()
        .filter(|(_, id)| !stored.contains(id))
        .count();
    assert_eq!(missing, 0, "every acknowledged message is in the sink");
    let enriched = gateway
        .all_sink_lines()
        .iter()
        .filter(|l| l["payload"].get("device_id").is_some())
        .count();
    assert!(
        enriched >= 50,
        "the new version serves after the reload ({enriched} enriched)"
    );
}
