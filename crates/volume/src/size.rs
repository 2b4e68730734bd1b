//! Sizes as people write them: `10G`, `512M`, `1.5T`, `4096`, `2MiB`, `1GB`
//! (binary units, as the seed's `overlay_size` and qemu-img use them).

/// Parses a size; units K, M, G, T, P (optionally followed by `B` or `iB`)
/// are powers of 1024, no unit means bytes. The error says what is wrong.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let idx = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(idx);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches("ib").trim_end_matches('b');
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(format!("{s:?}: unknown size unit (use K, M, G, T, P)")),
    };
    if num.is_empty() {
        return Err(format!("{s:?}: not a size"));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("{s:?}: size too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?}: size out of range"));
    }
    Ok(v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "1X", "99999999999P", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
