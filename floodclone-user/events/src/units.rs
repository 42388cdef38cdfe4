//! Sizes and durations as people write them, for the options of `floodclone` and of
//! `cargo xtask` alike: `64KiB`, `1MiB`, `500kB`, `4096`; `90s`, `2m`, `500ms`, `1.5`. A
//! plain number keeps the meaning it always had: bytes, seconds.

use std::time::Duration;

/// Splits `12.5MiB` into its number and its unit (trimmed).
fn number_and_unit<'a>(s: &'a str, what: &str, example: &str) -> Result<(f64, &'a str), String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{what} {s:?}: expected a number, optionally followed by a unit like {example}")
    })?;
    Ok((value, unit.trim()))
}

/// A byte size: `64MiB`, `1GiB`, `500kB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (value, unit) = number_and_unit(s, "size", "MiB")?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "k" | "kB" | "KB" => 1_000,
        "KiB" | "K" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" | "M" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (use B, kB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    Ok((value * mult as f64).round() as u64)
}

/// A duration: `90s`, `2m`, `500ms`, `1h`, `1.5` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (value, unit) = number_and_unit(s, "duration", "s or m")?;
    let secs = match unit {
        "" | "s" | "sec" => value,
        "ms" => value / 1e3,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
            "duration {s:?}: unknown unit {other:?} (use ms, s, m, h; a plain number is seconds)"
        ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("1.5kB").unwrap(), 1500);
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn durations() {
        let s = Duration::from_secs_f64;
        assert_eq!(parse_duration("90s").unwrap(), s(90.0));
        assert_eq!(parse_duration("2m").unwrap(), s(120.0));
        assert_eq!(parse_duration("500ms").unwrap(), s(0.5));
        assert_eq!(parse_duration("1.5").unwrap(), s(1.5));
        assert_eq!(parse_duration("0").unwrap(), s(0.0));
        assert_eq!(parse_duration("1h").unwrap(), s(3600.0));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("1e400").is_err());
    }
}
