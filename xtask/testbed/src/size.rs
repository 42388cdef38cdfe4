//! Byte sizes as people write them: `64MiB`, `1GiB`, `500kB`, `4096`.

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number followed by a unit like MiB"))?;
    let mult: u64 = match unit.trim() {
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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        use super::parse_size;
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("1.5kB").unwrap(), 1500);
        assert!(parse_size("3 parsecs").is_err());
    }
}
