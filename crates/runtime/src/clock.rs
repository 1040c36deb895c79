//! The injected clock. Every service judges requests by this clock, never by a date in a request.
use std::time::Instant;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Deserialize;

/// `[clock]`: at most one of `fixed`, `start`; `offset_seconds` applies to the system clock.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Time stands still at this instant (tests).
    pub fixed: Option<DateTime<Utc>>,
    /// Time starts at this instant when the process starts, then runs (demos).
    pub start: Option<DateTime<Utc>>,
    /// Added to the system clock.
    #[serde(default)]
    pub offset_seconds: i64,
}

#[derive(Debug, Clone)]
pub enum Clock {
    System { offset: Duration },
    Fixed(DateTime<Utc>),
    Running { start: DateTime<Utc>, since: Instant },
}

impl Clock {
    pub fn from_config(config: &ClockConfig) -> Result<Self, String> {
        match (config.fixed, config.start) {
            (Some(_), Some(_)) => Err("clock.fixed and clock.start are exclusive; set one".into()),
            (Some(at), None) => Ok(Self::Fixed(at)),
            (None, Some(start)) => Ok(Self::Running { start, since: Instant::now() }),
            (None, None) => Ok(Self::System { offset: Duration::seconds(config.offset_seconds) }),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System { offset } => Utc::now() + *offset,
            Self::Fixed(at) => *at,
            Self::Running { start, since } => {
                *start + Duration::from_std(since.elapsed()).unwrap_or_else(|_| Duration::zero())
            }
        }
    }

    pub fn today(&self) -> NaiveDate {
        self.now().date_naive()
    }
}
