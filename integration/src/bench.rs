//! What the benchmark binaries share: the median, and the one figure every shim is timed on.

use std::time::{Duration, Instant};

use crate::{unique_id, Containerd, BUSYBOX_REF};

/// The median of `v` (sorted in place); NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Wall time of `ctr run --rm --runtime <runtime> busybox true`.
pub fn run_rm(c: &Containerd, runtime: &str) -> Duration {
    let id = unique_id("bench");
    let t = Instant::now();
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    t.elapsed()
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&mut []).is_nan());
    }
}
