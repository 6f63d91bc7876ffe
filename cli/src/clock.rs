//! Times on the command line: read as milliseconds since the epoch, an
//! RFC 3339 time or a span ago; shown as RFC 3339 UTC.

/// Days from 1970-01-01 to the civil date `y-m-d` (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `ms` since the epoch as `2026-11-27T16:30:00.123Z`.
pub(crate) fn format_ms(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let s = rest / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        rest % 1000
    )
}

fn number(s: &str, what: &str, range: std::ops::RangeInclusive<i64>) -> Result<i64, String> {
    let n: i64 = s
        .parse()
        .ok()
        .filter(|_| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("{what} {s:?} is not a number"))?;
    if !range.contains(&n) {
        return Err(format!("{what} {n} is out of range"));
    }
    Ok(n)
}

/// An RFC 3339 time (`2026-11-27T16:30:00Z`, with optional fractional
/// seconds, `Z` or a `+HH:MM`/`-HH:MM` offset) in ms since the epoch.
fn rfc3339(s: &str) -> Result<i64, String> {
    let (date, rest) = s
        .split_once(['T', 't', ' '])
        .ok_or("expected DATE'T'TIME")?;
    let mut parts = date.splitn(3, '-');
    let mut next = |what, range| number(parts.next().unwrap_or_default(), what, range);
    let (y, mo, d) = (
        next("year", 0..=9999)?,
        next("month", 1..=12)?,
        next("day", 1..=31)?,
    );
    let (clock, offset_min) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (c, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (h, m) = z[1..].split_once(':').ok_or("offset must be ±HH:MM")?;
        (
            c,
            sign * (number(h, "offset hours", 0..=23)? * 60 + number(m, "offset minutes", 0..=59)?),
        )
    } else {
        return Err("missing a zone: end with Z or ±HH:MM".into());
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let mut next = |what, range| number(t.next().unwrap_or_default(), what, range);
    let (h, mi, sec) = (
        next("hour", 0..=23)?,
        next("minute", 0..=59)?,
        next("second", 0..=60)?,
    );
    let millis = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        number(&digits, "fraction", 0..=999)?
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d > month_days[(mo - 1) as usize] {
        return Err(format!("day {d} is not in month {mo} of {y}"));
    }
    let days = days_from_civil(y, mo, d);
    Ok(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset_min * 60) * 1000 + millis)
}

/// A time given on the command line, in ms since the epoch: digits are
/// ms since the epoch; `30s`, `15m`, `2h` or `7d` is that long before
/// `now_ms`; anything else must be an RFC 3339 time.
pub(crate) fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i64 = s
            .parse()
            .map_err(|_| anyhow::anyhow!("time {s:?} is out of range"))?;
        // Seconds since the epoch (`date +%s`) read as ms would be 1970:
        // a replay of everything.
        if ms < 100_000_000_000 {
            anyhow::bail!(
                "time {s:?}: ms since the epoch are 13 digits (this looks like seconds: add 000)"
            );
        }
        return Ok(ms);
    }
    if let Some(unit) = s.chars().last()
        && let Some(scale) = match unit {
            's' => Some(1_000),
            'm' => Some(60_000),
            'h' => Some(3_600_000),
            'd' => Some(86_400_000),
            _ => None,
        }
        && let Ok(n) = s[..s.len() - 1].parse::<i64>()
        && n >= 0
    {
        return Ok(now_ms.saturating_sub(n.saturating_mul(scale)));
    }
    rfc3339(s).map_err(|e| {
        anyhow::anyhow!(
            "time {s:?}: {e} (give ms since the epoch, a span ago such as 15m, or an RFC 3339 time such as 2026-11-27T16:30:00Z)"
        )
    })
}

/// Now, in ms since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_and_print_as_rfc3339() -> anyhow::Result<()> {
        let t = parse_time("2026-11-27T16:30:00.5Z", 0)?;
        assert_eq!(t, 1_795_797_000_500);
        assert_eq!(format_ms(t), "2026-11-27T16:30:00.500Z");
        assert_eq!(parse_time("2026-11-27T17:30:00.500+01:00", 0)?, t);
        assert_eq!(parse_time("1795797000500", 0)?, t);
        assert_eq!(parse_time("15m", 1_000_000)?, 100_000);
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_time("2000-02-29T00:00:00Z", 0)?, 951_782_400_000);
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-27T16:30:00",
            "2026-02-29T00:00:00Z",
            "1795797000",
            "-5m",
            "",
        ] {
            assert!(parse_time(bad, 0).is_err(), "{bad:?} was accepted");
        }
        Ok(())
    }
}
