//! Times as the table holds them (UTC, read as microseconds since 1970 so that no session
//! time zone applies) and as people and scripts read them (RFC 3339).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// SQL reading the `DATETIME` column `column` as microseconds since 1970, UTC.
pub(crate) fn micros_of(column: &str) -> String {
    format!("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column})")
}

/// SQL for the age of the `DATETIME` value `expr` by the database's clock, in microseconds.
pub(crate) fn age_of(expr: &str) -> String {
    format!("TIMESTAMPDIFF(MICROSECOND, {expr}, UTC_TIMESTAMP(6))")
}

/// SQL for a `DATETIME` from a parameter of microseconds since 1970.
pub(crate) const AT_MICROS: &str = "TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00')";

/// A time read with [`micros_of`].
pub(crate) fn time(micros: i64) -> SystemTime {
    let offset = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + offset
    } else {
        UNIX_EPOCH - offset
    }
}

/// A time read with [`micros_of`] from a column where 1970-01-01 means never.
pub(crate) fn time_or_never(micros: i64) -> Option<SystemTime> {
    (micros != 0).then(|| time(micros))
}

/// An age read with [`age_of`]; a time ahead of the database's clock is no age.
pub(crate) fn age(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// Microseconds since 1970 of `time`, for [`AT_MICROS`].
pub(crate) fn micros_since_epoch(time: SystemTime) -> i64 {
    let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => micros(after),
        Err(before) => -micros(before.duration()),
    }
}

/// `time` in RFC 3339, UTC, to the microsecond: `2026-12-02T09:30:00.123456Z`.
pub fn rfc3339(time: SystemTime) -> String {
    match jiff::Timestamp::from_microsecond(micros_since_epoch(time)) {
        Ok(timestamp) => timestamp.to_string(),
        Err(_) => format!("{time:?}"),
    }
}

/// Seconds, with their fraction, for JSON.
pub(crate) fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_microseconds_on_both_sides_of_1970() {
        for micros in [1_764_667_800_123_456_i64, 1, -86_400_000_001] {
            assert_eq!(micros_since_epoch(time(micros)), micros);
        }
        assert_eq!(time_or_never(0), None);
        assert_eq!(age(-5), Duration::ZERO);
        assert_eq!(
            rfc3339(time(1_764_667_800_123_456)),
            "2025-12-02T09:30:00.123456Z"
        );
    }
}
