//! Reading counters out of OpenMetrics text, as `/metrics` and prometheus-client's
//! encoder write it.

use std::collections::BTreeMap;

/// The sum of every series of the family `name` (exact name, any labels), for
/// example `libp2p_gossipsub_topic_msg_recv_counts_total` over all topics.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The family `name` summed per value of `label` (series without it are left out),
/// for example dials by purpose.
pub fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    let needle = format!("{label}=\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(labelled) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = labelled.rsplit_once("} ") else {
            continue;
        };
        let start = if labels.starts_with(&needle) {
            Some(0)
        } else {
            labels.find(&format!(",{needle}")).map(|i| i + 1)
        };
        let Some(start) = start else {
            continue;
        };
        let rest = &labels[start + needle.len()..];
        let Some(end) = rest.find('"') else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *sums.entry(rest[..end].to_string()).or_insert(0.0) += value;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_exactly_one_family() {
        let text = "# HELP x_total help\n\
                    x_total{hash=\"a\"} 3\n\
                    x_total{hash=\"b\"} 4\n\
                    x_total_other 100\n\
                    x 9\n\
                    y_total 1\n";
        assert_eq!(sum(text, "x_total"), 7.0);
        assert_eq!(sum(text, "x"), 9.0);
        assert_eq!(sum(text, "z"), 0.0);
    }

    #[test]
    fn sums_by_one_label() {
        let text = "d_total{purpose=\"api\"} 4\n\
                    d_total{purpose=\"kad\",x=\"1\"} 2\n\
                    d_total{x=\"1\",purpose=\"kad\"} 3\n\
                    d_total{xpurpose=\"no\"} 5\n\
                    d_total 7\n";
        let sums = by_label(text, "d_total", "purpose");
        assert_eq!(sums.get("api"), Some(&4.0));
        assert_eq!(sums.get("kad"), Some(&5.0));
        assert_eq!(sums.len(), 2);
    }
}
