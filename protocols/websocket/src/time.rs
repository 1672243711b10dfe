//! Timestamps as Pulsar's WebSocket API writes them (`publishTime`,
//! `eventTime`): ISO-8601 with an offset, milliseconds with trailing zeros
//! trimmed. Magnetar writes UTC (`Z`), as a Pulsar broker running in UTC.

use crate::{Result, WsError};

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch, as `2020-11-18T09:58:23.355Z`.
pub fn format_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rest = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil(days);
    let (h, mi, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    let mut out = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    if milli != 0 {
        let frac = format!("{milli:03}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Reads what [`format_ms`] writes, and any offset (`+02:00`) or fraction
/// length Pulsar's clients send as `eventTime`.
pub fn parse_ms(s: &str) -> Result<i64> {
    let bad = || WsError::Time(format!("'{s}' is not an ISO-8601 time with an offset"));
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        s.get(r)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let (sec, mut i) = if b.get(16) == Some(&b':') {
        (num(17..19)?, 19)
    } else {
        (0, 16)
    };
    let mut milli = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i).filter(|t| !t.is_empty()).ok_or_else(bad)?;
        let mut three = digits.chars().take(3).collect::<String>();
        while three.len() < 3 {
            three.push('0');
        }
        milli = three.parse().map_err(|_| bad())?;
    }
    let offset_min = match s.get(i..) {
        Some("Z") => 0,
        Some(o)
            if o.len() == 6
                && (o.starts_with('+') || o.starts_with('-'))
                && o.as_bytes()[3] == b':' =>
        {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok((((days * 24 + h) * 60 + mi - offset_min) * 60 + sec) * 1000 + milli)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pulsar_shaped_times() {
        assert_eq!(format_ms(1_605_693_503_355), "2020-11-18T09:58:23.355Z");
        assert_eq!(format_ms(1_605_693_503_000), "2020-11-18T09:58:23Z");
        assert_eq!(format_ms(1_605_693_503_300), "2020-11-18T09:58:23.3Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_ms("2021-10-29T16:01:38.967-07:00").expect("time"),
            parse_ms("2021-10-29T23:01:38.967Z").expect("time")
        );
        assert_eq!(
            parse_ms("2020-11-18T09:58:23.355Z").expect("time"),
            1_605_693_503_355
        );
        for bad in [
            "",
            "2020-11-18",
            "2020-11-18T09:58:23",
            "1605693503355",
            "2020-13-18T09:58:23Z",
        ] {
            assert!(parse_ms(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn times_round_trip(ms in 0i64..253_402_300_799_999) {
            prop_assert_eq!(parse_ms(&format_ms(ms)).expect("round trip"), ms);
        }

        #[test]
        fn any_text_parses_or_errs(s in ".{0,40}") {
            let _ = parse_ms(&s);
        }
    }
}
