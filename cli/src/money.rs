//! USD amounts on the command line ↔ integer micro-USD, without floating point.

/// Parses `"1"`, `"0.05"`, `"$2.500000"` into micro-USD. At most 6 decimals.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    rhizos_broker::wire::parse_usd(text)
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
