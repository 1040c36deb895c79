//! The injected clock. Every service judges requests by this clock, never by a date in a request.
//!
//! Instants are UTC; every *date* a rule uses (policy phase, age, renewal window, validity, expiry,
//! "birth date not in the future") is the calendar date in the clock's time zone, `clock.time_zone`
//! (default `Asia/Shanghai`): [`Clock::today`] and [`Clock::date_of`] are the only conversions.
use std::time::Instant;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

/// The zone the rulebook's dates are dates in: China.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Shanghai";

/// `[clock]`: at most one of `fixed`, `start`; `offset_seconds` applies to the system clock;
/// `time_zone` names the IANA zone whose calendar dates the rules use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Time stands still at this instant (tests).
    pub fixed: Option<DateTime<Utc>>,
    /// Time starts at this instant when the process starts, then runs (demos).
    pub start: Option<DateTime<Utc>>,
    /// Added to the system clock.
    #[serde(default)]
    pub offset_seconds: i64,
    /// IANA time zone name; "today" is the date there.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    DEFAULT_TIME_ZONE.to_owned()
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self { fixed: None, start: None, offset_seconds: 0, time_zone: default_time_zone() }
    }
}

impl ClockConfig {
    /// A clock standing still at `at`, in the default zone (tests).
    pub fn fixed_at(at: DateTime<Utc>) -> Self {
        Self { fixed: Some(at), ..Self::default() }
    }
}

/// Parses an IANA time zone name (`Asia/Shanghai`, `UTC`); the message is for the operator.
pub fn parse_time_zone(name: &str) -> Result<Tz, String> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| format!("time_zone {name:?} is not an IANA time zone name (for example {DEFAULT_TIME_ZONE:?})"))
}

#[derive(Debug, Clone)]
enum Source {
    System { offset: Duration },
    Fixed(DateTime<Utc>),
    Running { start: DateTime<Utc>, since: Instant },
}

/// Where "now" comes from, and the zone whose dates the rules use.
#[derive(Debug, Clone)]
pub struct Clock {
    source: Source,
    zone: Tz,
}

impl Clock {
    pub fn from_config(config: &ClockConfig) -> Result<Self, String> {
        let zone = parse_time_zone(&config.time_zone)?;
        let source = match (config.fixed, config.start) {
            (Some(_), Some(_)) => return Err("clock.fixed and clock.start are exclusive; set one".into()),
            (Some(at), None) => Source::Fixed(at),
            (None, Some(start)) => Source::Running { start, since: Instant::now() },
            (None, None) => Source::System { offset: Duration::seconds(config.offset_seconds) },
        };
        Ok(Self { source, zone })
    }

    /// A clock standing still at `at`, in the default zone (tests).
    pub fn fixed(at: DateTime<Utc>) -> Self {
        Self { source: Source::Fixed(at), zone: default_zone() }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.source {
            Source::System { offset } => Utc::now() + *offset,
            Source::Fixed(at) => *at,
            Source::Running { start, since } => {
                *start + Duration::from_std(since.elapsed()).unwrap_or_else(|_| Duration::zero())
            }
        }
    }

    /// The zone whose calendar dates the rules use.
    pub fn time_zone(&self) -> Tz {
        self.zone
    }

    /// The date of `instant` in the clock's zone: the one conversion from an instant to a rule's date.
    pub fn date_of(&self, instant: DateTime<Utc>) -> NaiveDate {
        instant.with_timezone(&self.zone).date_naive()
    }

    /// Today, in the clock's zone.
    pub fn today(&self) -> NaiveDate {
        self.date_of(self.now())
    }

    /// The instant `day` begins in the clock's zone (its first existing minute, where a change to
    /// summer time skips midnight).
    pub fn start_of(&self, day: NaiveDate) -> DateTime<Utc> {
        (0..=2)
            .find_map(|hour| {
                let local = day.and_time(NaiveTime::from_hms_opt(hour, 0, 0)?);
                self.zone.from_local_datetime(&local).earliest()
            })
            .map(|start| start.with_timezone(&Utc))
            .unwrap_or_else(|| day.and_time(NaiveTime::MIN).and_utc())
    }
}

fn default_zone() -> Tz {
    chrono_tz::Asia::Shanghai
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(instant: &str) -> DateTime<Utc> {
        instant.parse().unwrap()
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn today_is_the_date_in_beijing_by_default() {
        let clock = |instant| Clock::from_config(&ClockConfig::fixed_at(at(instant))).unwrap();
        assert_eq!(clock("2115-06-30T15:30:00Z").today(), date(2115, 6, 30), "23:30 Beijing");
        assert_eq!(clock("2115-06-30T16:00:00Z").today(), date(2115, 7, 1), "midnight Beijing");
        assert_eq!(clock("2115-06-30T23:30:00Z").today(), date(2115, 7, 1), "07:30 Beijing");
        assert_eq!(clock("2115-07-01T00:30:00Z").today(), date(2115, 7, 1), "08:30 Beijing");
        assert_eq!(Clock::fixed(at("2115-06-30T23:30:00Z")).today(), date(2115, 7, 1));
        assert_eq!(Clock::fixed(at("2115-06-30T23:30:00Z")).time_zone(), chrono_tz::Asia::Shanghai);
        assert_eq!(Clock::fixed(at("2115-06-30T23:30:00Z")).start_of(date(2115, 7, 1)), at("2115-06-30T16:00:00Z"));
    }

    #[test]
    fn another_zone_may_be_configured_and_a_bad_name_is_refused() {
        let mut config = ClockConfig::fixed_at(at("2115-06-30T23:30:00Z"));
        config.time_zone = "UTC".into();
        assert_eq!(Clock::from_config(&config).unwrap().today(), date(2115, 6, 30));
        config.time_zone = "Mars/Olympus_Mons".into();
        let error = Clock::from_config(&config).unwrap_err();
        assert!(error.contains("time_zone") && error.contains("Mars/Olympus_Mons"), "{error}");
    }

    #[test]
    fn the_section_defaults_to_asia_shanghai() {
        let config: ClockConfig = toml::from_str("offset_seconds = 5").unwrap();
        assert_eq!(config.time_zone, DEFAULT_TIME_ZONE);
        let config: ClockConfig = toml::from_str("time_zone = \"Asia/Urumqi\"").unwrap();
        assert_eq!(Clock::from_config(&config).unwrap().time_zone(), chrono_tz::Asia::Urumqi);
    }
}
