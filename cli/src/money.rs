//! USD amounts on the command line ↔ integer micro-USD, without floating point.

/// Parses `"1"`, `"0.05"`, `"$2.500000"` into micro-USD. At most 6 decimals.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    let trimmed = text.trim().trim_start_matches('$');
    let (whole, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
        return Err(format!(
            "{text:?} is not an amount in USD (examples: 5, 0.25, 0.000150)"
        ));
    }
    if fraction.len() > 6 {
        return Err(format!(
            "{text:?} has more than 6 decimals; the smallest unit is 0.000001 USD"
        ));
    }
    let whole: i64 = whole
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let fraction: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}")
            .parse()
            .map_err(|_| "bad decimals")?
    };
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `1234567` → `$1.234567`.
pub fn format_usd(micros: i64) -> String {
    rhizos_broker::wire::format_usd(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_parses_exactly() {
        assert_eq!(parse_usd("5"), Ok(5_000_000));
        assert_eq!(parse_usd("0.05"), Ok(50_000));
        assert_eq!(parse_usd("$0.000001"), Ok(1));
        assert_eq!(parse_usd("12.345678"), Ok(12_345_678));
        assert!(parse_usd("0.0000001").unwrap_err().contains("6 decimals"));
        assert!(parse_usd("-1").is_err());
        assert!(parse_usd("1e3").is_err());
        assert!(parse_usd("").is_err());
        assert!(parse_usd("99999999999999999").is_err());
    }

    #[test]
    fn usd_formats_with_six_decimals() {
        assert_eq!(format_usd(1_234_567), "$1.234567");
        assert_eq!(format_usd(50), "$0.000050");
        assert_eq!(format_usd(-2_000_000), "-$2.000000");
    }
}
