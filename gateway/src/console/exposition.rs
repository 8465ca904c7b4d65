//! Reads the gateway's own Prometheus text exposition back into numbers.
//!
//! `prometheus-client` lets a family be read only by a label set one already knows, and
//! keeps histogram buckets to itself; the console needs every label set (routes, refusal
//! codes, plugins) and the buckets (for percentiles). Its text is the one complete,
//! stable view, so the console renders it and parses it here.

/// One line of the exposition: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The full name, e.g. `sluice_messages_total` or `…_bucket`.
    pub name: String,
    /// Labels in the order they were written.
    pub labels: Vec<(String, String)>,
    /// The value (`+Inf` is `f64::INFINITY`).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if it has one.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Every sample of `text`; comment lines and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    // The value, then an optional timestamp or exemplar.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value",…}`; the labels and what follows the `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let key = text[..eq].to_string();
        let mut chars = text[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (index, '"') => break index,
                (_, other) => value.push(other),
            }
        };
        labels.push((key, value));
        text = &text[eq + 1 + 1 + end + 1..];
    }
}

/// The sum of every sample named `name` whose labels satisfy `keep`.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name && keep(sample))
        .map(|sample| sample.value)
        .sum()
}

/// A histogram's cumulative buckets `(upper bound, count)`, lowest bound first, from the
/// `NAME_bucket` samples whose labels satisfy `keep`.
pub fn buckets(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|sample| sample.name == bucket && keep(sample))
        .filter_map(|sample| {
            let le = match sample.label("le")? {
                "+Inf" => f64::INFINITY,
                le => le.parse().ok()?,
            };
            Some((le, sample.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile (0..=1) of cumulative `buckets`, interpolated inside its bucket the
/// way Prometheus' `histogram_quantile` does; `None` when the histogram is empty. A
/// quantile in the `+Inf` bucket is the highest finite bound.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(upper, count) in buckets {
        if count >= rank && count > below {
            if upper.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (upper - lower) * (rank - below) / (count - below));
        }
        lower = upper;
        below = count;
    }
    Some(lower)
}

/// `now - before`, bucket by bucket (the buckets of one histogram at two instants).
pub fn difference(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, count)| {
            let earlier = before
                .iter()
                .find(|(bound, _)| *bound == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - earlier).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sluice_messages Input messages
# TYPE sluice_messages counter
sluice_messages_total{status="accepted"} 7
sluice_messages_total{status="rejected"} 2
sluice_routed_messages_total{route="rule:a \"quoted\", b\\c",destination="local"} 3
sluice_delivery_latency_seconds_bucket{sink="local",le="0.001"} 1
sluice_delivery_latency_seconds_bucket{sink="local",le="0.002"} 3
sluice_delivery_latency_seconds_bucket{sink="local",le="+Inf"} 4
sluice_spool_fsyncs 12
# EOF
"#;

    #[test]
    fn reads_names_labels_escapes_and_values() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[0].name, "sluice_messages_total");
        assert_eq!(samples[0].label("status"), Some("accepted"));
        assert_eq!(samples[2].label("route"), Some(r#"rule:a "quoted", b\c"#));
        assert_eq!(samples[2].label("destination"), Some("local"));
        assert_eq!(samples[6].labels, vec![]);
        assert_eq!(samples[6].value, 12.0);
        assert_eq!(sum(&samples, "sluice_messages_total", |_| true), 9.0);
        assert_eq!(
            sum(&samples, "sluice_messages_total", |s| s.label("status")
                == Some("accepted")),
            7.0
        );
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let samples = parse(TEXT);
        let buckets = buckets(&samples, "sluice_delivery_latency_seconds", |s| {
            s.label("sink") == Some("local")
        });
        assert_eq!(
            buckets,
            vec![(0.001, 1.0), (0.002, 3.0), (f64::INFINITY, 4.0)]
        );
        // Rank 2 of 4 is halfway through the second bucket.
        assert_eq!(quantile(&buckets, 0.5), Some(0.0015));
        // Rank 0.5 is halfway through the first, which starts at 0.
        assert_eq!(quantile(&buckets, 0.125), Some(0.0005));
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(quantile(&buckets, 0.99), Some(0.002));
        assert_eq!(quantile(&[(0.001, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_difference_keeps_what_happened_in_between() {
        let before = vec![(0.001, 1.0), (f64::INFINITY, 2.0)];
        let now = vec![(0.001, 1.0), (f64::INFINITY, 5.0)];
        let between = difference(&now, &before);
        assert_eq!(between, vec![(0.001, 0.0), (f64::INFINITY, 3.0)]);
        assert_eq!(quantile(&between, 0.5), Some(0.001));
    }

    #[test]
    fn the_gateways_own_exposition_parses() {
        crate::metrics::METRICS.message("accepted");
        let samples = parse(&crate::metrics::METRICS.render());
        assert!(
            sum(&samples, "sluice_messages_total", |s| s.label("status")
                == Some("accepted"))
                >= 1.0
        );
    }
}
