//! One place for retry delays: exponential, capped, with jitter (so that edges
//! retrying against one Keystone do not do so in step), from `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays between attempts: from `first`, doubling up to `max`, each with
/// random jitter, without end.
pub fn delays(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let d: Vec<Duration> = delays(first, max).take(12).collect();
        assert_eq!(d.len(), 12, "never ends");
        assert!(d[0] >= first && d[0] <= first * 2, "{d:?}");
        // Jitter adds at most one delay's worth.
        assert!(d.iter().all(|x| *x <= max * 2), "{d:?}");
        assert!(d[11] >= max, "reaches the cap: {d:?}");
    }
}
