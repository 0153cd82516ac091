//! Simulated work: latency distributions and seeded failure draws. The draws for one attempt of
//! one task depend only on the seed, the task key and the attempt, so a run is repeatable
//! whichever agent picks a task up and in whatever order.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};

/// How long a simulated task runs, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// `fixed:50` (or just `50`).
    Fixed(f64),
    /// `uniform:20..200`.
    Uniform(f64, f64),
    /// `exp:100`: exponential with this mean.
    Exp(f64),
    /// `normal:100,20`: mean and standard deviation, cut at 0.
    Normal(f64, f64),
}

impl Default for Latency {
    fn default() -> Self {
        Self::Uniform(20.0, 200.0)
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(ms) => write!(f, "fixed:{ms}"),
            Self::Uniform(a, b) => write!(f, "uniform:{a}..{b}"),
            Self::Exp(m) => write!(f, "exp:{m}"),
            Self::Normal(m, s) => write!(f, "normal:{m},{s}"),
        }
    }
}

impl FromStr for Latency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| -> Result<f64, String> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("`{v}` is not a non-negative number of milliseconds"))
        };
        let (kind, args) = s.split_once(':').unwrap_or(("fixed", s));
        let latency = match kind {
            "fixed" => Self::Fixed(num(args)?),
            "uniform" => {
                let (a, b) = args
                    .split_once("..")
                    .ok_or("uniform needs `uniform:MIN..MAX`")?;
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("uniform:{a}..{b}: MIN is above MAX"));
                }
                Self::Uniform(a, b)
            }
            "exp" => Self::Exp(num(args)?),
            "normal" => {
                let (m, sd) = args
                    .split_once(',')
                    .ok_or("normal needs `normal:MEAN,STDDEV`")?;
                Self::Normal(num(m)?, num(sd)?)
            }
            other => {
                return Err(format!(
                    "unknown latency distribution `{other}`: use fixed:MS, uniform:MIN..MAX, exp:MEAN or normal:MEAN,SD"
                ));
            }
        };
        Ok(latency)
    }
}

/// The random source of one attempt of one task.
pub fn rng_for(seed: u64, key: &str, attempt: i32) -> rand::rngs::StdRng {
    // FNV-1a over the key, mixed with the seed and attempt: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key.bytes().chain(attempt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    rand::rngs::StdRng::seed_from_u64(h)
}

impl Latency {
    /// A draw in milliseconds.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let ms = match *self {
            Self::Fixed(ms) => ms,
            Self::Uniform(a, b) if a == b => a,
            Self::Uniform(a, b) => rng.random_range(a..=b),
            Self::Exp(mean) => {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                -mean * u.ln()
            }
            Self::Normal(mean, sd) => {
                // Box–Muller.
                let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                let u2: f64 = rng.random_range(0.0..1.0);
                mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
        };
        ms.clamp(0.0, 3_600_000.0).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_reject_nonsense() {
        assert_eq!("50".parse::<Latency>().unwrap(), Latency::Fixed(50.0));
        assert_eq!(
            "uniform:20..200".parse::<Latency>().unwrap(),
            Latency::Uniform(20.0, 200.0)
        );
        assert_eq!("exp:100".parse::<Latency>().unwrap(), Latency::Exp(100.0));
        assert_eq!(
            "normal:100,20".parse::<Latency>().unwrap(),
            Latency::Normal(100.0, 20.0)
        );
        for bad in [
            "uniform:5",
            "uniform:9..1",
            "gamma:3",
            "fixed:-1",
            "fixed:x",
        ] {
            assert!(bad.parse::<Latency>().is_err(), "{bad}");
        }
    }

    #[test]
    fn draws_repeat_for_the_same_seed_key_and_attempt() {
        let l = Latency::Uniform(0.0, 1000.0);
        let a = l.sample(&mut rng_for(7, "impl/3", 1));
        assert_eq!(a, l.sample(&mut rng_for(7, "impl/3", 1)));
        let others: Vec<u64> = (0..8)
            .map(|i| l.sample(&mut rng_for(7, &format!("impl/{i}"), 1)))
            .collect();
        assert!(others.iter().any(|x| *x != a), "{others:?}");
        assert!((0..100).all(|i| l.sample(&mut rng_for(i, "k", 1)) <= 1000));
        assert!(Latency::Exp(100.0).sample(&mut rng_for(1, "k", 1)) < 3_600_000);
    }
}
