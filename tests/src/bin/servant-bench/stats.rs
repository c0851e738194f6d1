//! Comparing two samples of times: the difference of their medians, with a bootstrap
//! interval, so that a bench says "slower" only when its trials show it.
//!
//! Two implementations that run the same protocol differ by less than a trial's
//! spread, and a bare comparison of two medians then names a winner by chance. The
//! percentile bootstrap (resample each side with replacement, take the difference
//! of the resampled medians, read its 2.5th and 97.5th percentiles) needs no
//! assumption about the times' distribution, which for hole punches is skewed by
//! retries and scheduling.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Resamples per interval: enough that the percentiles move by less than the
/// figures' last printed digit from one seed to the next.
const RESAMPLES: usize = 4_000;

/// The median (the upper one of an even count), or `None` for no values.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

/// The difference `median(a) - median(b)` and its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// `median(a) - median(b)`.
    pub median_diff: f64,
    /// The interval's lower end.
    pub low: f64,
    /// The interval's upper end.
    pub high: f64,
}

/// `median(a) - median(b)` with its 95% percentile-bootstrap interval, or `None`
/// when either side is empty. The seed is fixed, so a report recomputes to the same
/// figures.
pub fn median_difference(a: &[f64], b: &[f64]) -> Option<Difference> {
    let median_diff = median(a.to_vec())? - median(b.to_vec())?;
    let mut rng = StdRng::seed_from_u64(0x5e7a7);
    let resample = |v: &[f64], rng: &mut StdRng| {
        let drawn = (0..v.len()).map(|_| v[rng.gen_range(0..v.len())]).collect();
        // Not empty: `v` was not, or `median` above returned.
        median(drawn).unwrap_or(f64::NAN)
    };
    let mut diffs: Vec<f64> = (0..RESAMPLES)
        .map(|_| resample(a, &mut rng) - resample(b, &mut rng))
        .collect();
    diffs.sort_by(|x, y| x.total_cmp(y));
    let at = |q: f64| diffs[((RESAMPLES - 1) as f64 * q).round() as usize];
    Some(Difference {
        median_diff,
        low: at(0.025),
        high: at(0.975),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn the_same_sample_twice_differs_by_nothing_certain() {
        let a: Vec<f64> = (0..30).map(|i| 100.0 + (i * 7 % 11) as f64).collect();
        let d = median_difference(&a, &a).expect("both sides have values");
        assert_eq!(d.median_diff, 0.0);
        assert!(d.low < 0.0 && d.high > 0.0, "{d:?}");
    }

    #[test]
    fn a_clear_shift_is_named_and_bounded() {
        let b: Vec<f64> = (0..30).map(|i| 100.0 + (i * 7 % 11) as f64).collect();
        let a: Vec<f64> = b.iter().map(|x| x + 20.0).collect();
        let d = median_difference(&a, &b).expect("both sides have values");
        assert_eq!(d.median_diff, 20.0);
        assert!(d.low > 0.0 && d.low <= 20.0 && d.high >= 20.0, "{d:?}");
        assert_eq!(median_difference(&a, &[]), None);
    }
}
