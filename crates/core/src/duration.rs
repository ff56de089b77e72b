//! Human durations as written in manifests and flags: `500ms`, `5s`, `2m`, `1m30s`, `1h`.

use std::time::Duration;

/// Parses a duration such as `5s` or `1m30s`. A bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total_ms: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration (use e.g. 500ms, 5s, 2m, 1h)"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` is not a duration"))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor: u128 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{text}` has unknown unit `{unit}` (use ms, s, m, h or d)"
                ));
            }
        };
        total_ms = total_ms
            .checked_add(n.checked_mul(factor).ok_or("duration too large")?)
            .ok_or("duration too large")?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| "duration too large".to_string())?;
    Ok(Duration::from_millis(ms))
}

/// Formats milliseconds back the way a user would write them.
pub fn format_ms(ms: u64) -> String {
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s5").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for ms in [1, 500, 1000, 90_000, 60_000, 3_600_000] {
            assert_eq!(
                parse_duration(&format_ms(ms)).map(|d| d.as_millis() as u64),
                Ok(ms)
            );
        }
    }
}
