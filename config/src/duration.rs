//! Go-style durations, as Traefik reads them.
//!
//! A duration is written like Go's `time.ParseDuration` (`30s`, `200ms`, `1h30m`, `-1s`, `1.5s`) or as a
//! bare integer, which means seconds (`30` = 30 s), exactly as Traefik's `ptypes.Duration` reads it.
//! Negative values are kept: several keys give them a meaning (`terminationDelay: -1s` = no deadline,
//! `dialKeepAlive: -1s` = keep-alive off).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A signed duration with nanosecond resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    nanos: i64,
}

/// Why a duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The string is empty.
    #[error("empty duration")]
    Empty,
    /// The string is not a Go duration nor an integer number of seconds.
    #[error(
        "invalid duration {input:?}: expected a Go duration such as \"30s\", \"200ms\", \"1h30m\" or an integer number of seconds"
    )]
    Invalid {
        /// The text that was read.
        input: String,
    },
    /// A unit other than ns, us, µs, ms, s, m, h.
    #[error("invalid duration {input:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit {
        /// The text that was read.
        input: String,
        /// The unit found.
        unit: String,
    },
    /// The value does not fit in 64-bit nanoseconds (about 292 years).
    #[error("invalid duration {input:?}: out of range")]
    Overflow {
        /// The text that was read.
        input: String,
    },
}

impl Duration {
    /// The zero duration.
    pub const ZERO: Duration = Duration { nanos: 0 };

    /// A duration of `nanos` nanoseconds (may be negative).
    pub const fn from_nanos(nanos: i64) -> Self {
        Duration { nanos }
    }

    /// A duration of `ms` milliseconds (may be negative).
    pub const fn from_millis(ms: i64) -> Self {
        Duration {
            nanos: ms.saturating_mul(1_000_000),
        }
    }

    /// A duration of `secs` seconds (may be negative).
    pub const fn from_secs(secs: i64) -> Self {
        Duration {
            nanos: secs.saturating_mul(1_000_000_000),
        }
    }

    /// The duration in nanoseconds.
    pub const fn as_nanos(self) -> i64 {
        self.nanos
    }

    /// True when the duration is below zero.
    pub const fn is_negative(self) -> bool {
        self.nanos < 0
    }

    /// True when the duration is exactly zero.
    pub const fn is_zero(self) -> bool {
        self.nanos == 0
    }

    /// The duration as a [`std::time::Duration`], or `None` when it is negative.
    pub const fn to_std(self) -> Option<std::time::Duration> {
        if self.nanos < 0 {
            None
        } else {
            Some(std::time::Duration::from_nanos(self.nanos as u64))
        }
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration {
            nanos: i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input)
    }
}

fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    // A bare integer means seconds, as in Traefik.
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1_000_000_000)
            .map(Duration::from_nanos)
            .ok_or_else(|| DurationError::Overflow {
                input: input.into(),
            });
    }
    let invalid = || DurationError::Invalid {
        input: input.into(),
    };
    let overflow = || DurationError::Overflow {
        input: input.into(),
    };
    let (neg, mut rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| DurationError::UnknownUnit {
                input: input.into(),
                unit: String::new(),
            })?;
        let number = &rest[..num_end];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(invalid());
        }
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    input: input.into(),
                    unit: unit.into(),
                });
            }
        };
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        let int: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut value = int.checked_mul(scale).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            let digits = frac_part.len().min(18) as u32;
            let frac: i128 = frac_part[..digits as usize]
                .parse()
                .map_err(|_| invalid())?;
            value += frac * scale / 10i128.pow(digits);
        }
        total = total.checked_add(value).ok_or_else(overflow)?;
        if total > i64::MAX as i128 {
            return Err(overflow());
        }
    }
    let nanos = if neg { -total } else { total };
    Ok(Duration::from_nanos(
        i64::try_from(nanos).map_err(|_| overflow())?,
    ))
}

impl fmt::Display for Duration {
    /// Formats like Go's `time.Duration.String()`: `1h30m0s`, `200ms`, `-1s`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.nanos;
        if n == 0 {
            return f.write_str("0s");
        }
        let neg = n < 0;
        let u = n.unsigned_abs();
        let sign = if neg { "-" } else { "" };
        if u < 1_000 {
            return write!(f, "{sign}{u}ns");
        }
        if u < 1_000_000 {
            return write!(f, "{sign}{}µs", trim_frac(u, 1_000));
        }
        if u < 1_000_000_000 {
            return write!(f, "{sign}{}ms", trim_frac(u, 1_000_000));
        }
        let hours = u / 3_600_000_000_000;
        let minutes = (u / 60_000_000_000) % 60;
        let secs_nanos = u % 60_000_000_000;
        f.write_str(sign)?;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write!(f, "{}s", trim_frac(secs_nanos, 1_000_000_000))
    }
}

/// `value / unit` with the fraction written without trailing zeros.
fn trim_frac(value: u64, unit: u64) -> String {
    let int = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return int.to_string();
    }
    let width = unit.ilog10() as usize;
    let frac = format!("{frac:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"200ms\", \"1h30m\" or an integer number of seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                v.checked_mul(1_000_000_000)
                    .map(Duration::from_nanos)
                    .ok_or_else(|| E::custom(format!("duration {v}s out of range")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                let v = i64::try_from(v)
                    .map_err(|_| E::custom(format!("duration {v}s out of range")))?;
                self.visit_i64(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("30s", 30_000_000_000),
            ("200ms", 200_000_000),
            ("1h30m", 5_400_000_000_000),
            ("1.5s", 1_500_000_000),
            ("-1s", -1_000_000_000),
            ("0", 0),
            ("30", 30_000_000_000),
            ("-5", -5_000_000_000),
            ("10us", 10_000),
            ("10µs", 10_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
        ];
        for (s, n) in cases {
            assert_eq!(s.parse::<Duration>().unwrap().as_nanos(), n, "{s}");
        }
    }

    #[test]
    fn rejects_garbage_with_the_input_named() {
        for s in ["", "abc", "10x", "1..5s", "s", "-"] {
            let err = s.parse::<Duration>().unwrap_err().to_string();
            if !s.is_empty() {
                assert!(err.contains(s), "{err} should name {s}");
            }
        }
    }

    #[test]
    fn displays_like_go() {
        for (n, s) in [
            (0, "0s"),
            (5_400_000_000_000, "1h30m0s"),
            (200_000_000, "200ms"),
            (-1_000_000_000, "-1s"),
            (1_500_000_000, "1.5s"),
            (15_000_000_000, "15s"),
        ] {
            assert_eq!(Duration::from_nanos(n).to_string(), s);
        }
    }

    #[test]
    fn round_trips_through_display() {
        for s in ["30s", "200ms", "1h30m0s", "-1s", "1.5s", "100ms"] {
            let d: Duration = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }
    }
}
