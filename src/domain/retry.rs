//! Retry delays: exponential backoff with "equal jitter" — half of the exponential step is
//! fixed, half random — so delays grow predictably yet retries of many tasks spread out.

use std::time::Duration;

use rand::Rng;

/// Backoff for failed attempts: the n-th failure waits between `step/2` and `step`, where
/// `step = min(max_delay, base_delay · 2^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The un-jittered ceiling for the `failures`-th failure (1-based).
    pub fn step(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        let step = self.base_delay.saturating_mul(1u32 << exp);
        step.min(self.max_delay)
    }

    /// The delay before the next attempt after `failures` failures, jittered with `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, failures: u32, rng: &mut R) -> Duration {
        let step = self.step(failures);
        let half = step / 2;
        let extra_ms = rng.random_range(0..=(step - half).as_millis() as u64);
        half + Duration::from_millis(extra_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_until_the_cap_and_jitter_stays_in_bounds() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
        };
        let steps: Vec<u128> = (1..=6).map(|n| p.step(n).as_millis()).collect();
        assert_eq!(steps, vec![100, 200, 400, 800, 1_000, 1_000]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in 1..=6 {
            for _ in 0..200 {
                let d = p.delay(n, &mut rng);
                assert!(d >= p.step(n) / 2 && d <= p.step(n), "failure {n}: {d:?}");
            }
        }
        // The jitter really varies.
        let distinct: std::collections::HashSet<_> =
            (0..50).map(|_| p.delay(4, &mut rng)).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let p = RetryPolicy::default();
        assert_eq!(p.step(u32::MAX), p.max_delay);
    }
}

/// What happens after an attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again once the delay has passed.
    RetryAfter(Duration),
    /// `max_attempts` reached: the task fails for good.
    GiveUp,
}

impl RetryPolicy {
    /// Decides the fate of a task whose `failures`-th attempt (1-based) just failed.
    pub fn after_failure<R: Rng + ?Sized>(
        &self,
        failures: u32,
        max_attempts: u32,
        rng: &mut R,
    ) -> AfterFailure {
        if failures >= max_attempts {
            AfterFailure::GiveUp
        } else {
            AfterFailure::RetryAfter(self.delay(failures, rng))
        }
    }
}

#[cfg(test)]
mod cutoff_tests {
    use super::*;

    #[test]
    fn gives_up_exactly_at_max_attempts() {
        let p = RetryPolicy::default();
        let mut rng = rand::rng();
        assert!(matches!(
            p.after_failure(1, 3, &mut rng),
            AfterFailure::RetryAfter(_)
        ));
        assert!(matches!(
            p.after_failure(2, 3, &mut rng),
            AfterFailure::RetryAfter(_)
        ));
        assert_eq!(p.after_failure(3, 3, &mut rng), AfterFailure::GiveUp);
        assert_eq!(p.after_failure(1, 1, &mut rng), AfterFailure::GiveUp);
    }
}
