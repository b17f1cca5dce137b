//! Timestamps in the two text forms AWS writes: the access-log form of
//! `requestContext.requestTime` (`09/Feb/2024:18:23:28 +0000`) and ISO 8601
//! (`2024-02-09T18:23:28.941Z`, `GetConnection`'s `connectedAt`). UTC only.

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard
/// Hinnant's civil-from-days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

struct Parts {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    minute: i64,
    second: i64,
    millis: i64,
}

fn parts(epoch_ms: i64) -> Parts {
    let secs = epoch_ms.div_euclid(1000);
    let (year, month, day) = civil(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    Parts {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem % 3600 / 60,
        second: rem % 60,
        millis: epoch_ms.rem_euclid(1000),
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `09/Feb/2024:18:23:28 +0000`.
pub fn request_time(epoch_ms: i64) -> String {
    let p = parts(epoch_ms);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        p.day,
        MONTHS[(p.month - 1) as usize],
        p.year,
        p.hour,
        p.minute,
        p.second
    )
}

/// `2024-02-09T18:23:28.941Z`.
pub fn iso8601(epoch_ms: i64) -> String {
    let p = parts(epoch_ms);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        p.year, p.month, p.day, p.hour, p.minute, p.second, p.millis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        // The disconnect fixture of aws_lambda_events: 1707503008941 is
        // 09/Feb/2024:18:23:28 +0000.
        assert_eq!(
            request_time(1_707_503_008_941),
            "09/Feb/2024:18:23:28 +0000"
        );
        assert_eq!(iso8601(1_707_503_008_941), "2024-02-09T18:23:28.941Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        // A leap day and the end of a year.
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            request_time(1_704_067_199_000),
            "31/Dec/2023:23:59:59 +0000"
        );
    }
}
