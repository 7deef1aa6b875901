//! Times and durations as operators type them, and as `cnnfctl` prints them.
//!
//! A time is RFC 3339 (`2026-01-31T14:02:00Z`), `now`, or a duration
//! meaning that long ago (`15m`); a duration is one or more
//! `<number><unit>` with units `s`, `m`, `h`, `d`, `w` (`1h30m`). The
//! services speak Unix nanoseconds; tables show RFC 3339 in UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Parses a duration like `90s`, `15m`, `2h`, `7d`, `1w` or `1h30m` into seconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let hint = || format!("{text:?} is not a duration: expected for example 90s, 15m, 2h, 7d or 1h30m");
    let text_trimmed = text.trim();
    if text_trimmed.is_empty() {
        return Err(hint());
    }
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in text_trimmed.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(hint()),
        };
        if digits.is_empty() {
            return Err(hint());
        }
        let value: i64 = digits.parse().map_err(|_| hint())?;
        total = value
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| format!("{text:?} is too long a duration"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(hint());
    }
    Ok(total)
}

/// Parses a time relative to `now` (Unix nanoseconds): RFC 3339, `now`,
/// or a duration meaning that long before `now`. Unix nanoseconds.
pub fn parse_time_at(text: &str, now: i64) -> Result<i64, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Ok(at) = OffsetDateTime::parse(trimmed, &Rfc3339) {
        return i64::try_from(at.unix_timestamp_nanos()).map_err(|_| format!("{text:?} is out of range"));
    }
    match parse_duration(trimmed) {
        Ok(seconds) => Ok(now.saturating_sub(seconds.saturating_mul(NANOS_PER_SECOND))),
        Err(_) => Err(format!(
            "{text:?} is not a time: expected RFC 3339 (2026-01-31T14:02:00Z), `now`, or how long ago (15m, 2h, 7d)"
        )),
    }
}

/// The current time, Unix nanoseconds.
pub fn now_nanos() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// clap value parser for times: see [`parse_time_at`].
pub fn parse_time(text: &str) -> Result<i64, String> {
    parse_time_at(text, now_nanos())
}

/// Unix nanoseconds as RFC 3339 in UTC; `-` for 0 (unset).
pub fn format_nanos(nanos: i64) -> String {
    if nanos == 0 {
        return "-".to_owned();
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| nanos.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600 * NANOS_PER_SECOND; // 2026-01-01T00:00:00Z

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("1w"), Ok(604_800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        for bad in ["", "h", "15", "15x", "1.5h", "-1h", "m15"] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
        assert!(parse_duration("99999999999999999w").unwrap_err().contains("too long"));
    }

    #[test]
    fn times() {
        assert_eq!(parse_time_at("now", NOW), Ok(NOW));
        assert_eq!(parse_time_at("15m", NOW), Ok(NOW - 900 * NANOS_PER_SECOND));
        assert_eq!(parse_time_at("2026-01-01T00:00:00Z", 0), Ok(NOW));
        assert_eq!(
            parse_time_at("2026-01-01T01:00:00.5+01:00", 0),
            Ok(NOW + NANOS_PER_SECOND / 2)
        );
        let error = parse_time_at("yesterday", NOW).unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
        assert!(parse_time_at("2026-13-01T00:00:00Z", NOW).is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_nanos(0), "-");
        assert_eq!(format_nanos(NOW), "2026-01-01T00:00:00Z");
        assert_eq!(format_nanos(NOW + 1_500_000), "2026-01-01T00:00:00.0015Z");
    }
}
