//! Wall-clock time as the records keep it: seconds since the epoch (QMP's
//! event timestamps use the same), and one readable form for people.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch.
pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub fn utc_time(ts: f64) -> String {
    let ms = (ts * 1000.0).round() as i64;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = ms_of_day / 1000;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC", s / 3600, s / 60 % 60, s % 60, ms_of_day % 1000)
}

/// A duration for people: `42s`, `3m 5s`, `2h 10m`.
pub fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_as_utc() {
        assert_eq!(utc_time(0.0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_time(1_764_093_781.123_4), "2025-11-25 18:03:01.123 UTC");
        assert_eq!(utc_time(951_782_400.0), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(utc_time(4_107_542_399.999), "2100-02-28 23:59:59.999 UTC");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(42.9), "42s");
        assert_eq!(human_duration(185.0), "3m 5s");
        assert_eq!(human_duration(7800.0), "2h 10m");
    }
}
