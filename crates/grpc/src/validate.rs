//! Request validation helpers: each problem becomes a field violation naming the field.
use chrono::NaiveDate;
use yidi_domain::{IdNumber, id_number::province_name};

use crate::error::FieldViolations;

/// Upper bound on free-text fields; protects databases and logs from oversized input.
pub const MAX_TEXT_LEN: usize = 256;
/// Upper bound on a biometric template.
pub const MAX_TEMPLATE_LEN: usize = 4096;

impl FieldViolations {
    /// A required string of at most `max` bytes.
    pub fn required<'a>(&mut self, field: &str, value: &'a str, max: usize) -> Option<&'a str> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            self.add(field, "is required");
            None
        } else if value.len() > max {
            self.add(field, format!("must be at most {max} bytes, found {}", value.len()));
            None
        } else {
            Some(trimmed)
        }
    }

    /// An optional string of at most `max` bytes.
    pub fn bounded<'a>(&mut self, field: &str, value: &'a str, max: usize) -> Option<&'a str> {
        if value.len() > max {
            self.add(field, format!("must be at most {max} bytes, found {}", value.len()));
            None
        } else {
            Some(value.trim())
        }
    }

    /// A valid identity number (N1, N2) judged on `today`.
    pub fn id_number(&mut self, field: &str, value: &str, today: NaiveDate) -> Option<IdNumber> {
        if value.trim().is_empty() {
            self.add(field, "is required");
            return None;
        }
        if value.len() > 64 {
            self.add(field, "must be 18 characters");
            return None;
        }
        IdNumber::parse(value, today).map_err(|error| self.add(field, error.to_string())).ok()
    }

    /// A two-digit province code (N3).
    pub fn province<'a>(&mut self, field: &str, value: &'a str) -> Option<&'a str> {
        let value = self.required(field, value, 2)?;
        if province_name(value).is_some() {
            Some(value)
        } else {
            self.add(field, format!("{value:?} is not a province code"));
            None
        }
    }

    /// A biometric template that is present and not oversized.
    pub fn template<'a>(&mut self, field: &str, value: &'a [u8]) -> Option<&'a [u8]> {
        if value.is_empty() {
            self.add(field, "is required (captured at the counter)");
            None
        } else if value.len() > MAX_TEMPLATE_LEN {
            self.add(field, format!("must be at most {MAX_TEMPLATE_LEN} bytes"));
            None
        } else {
            Some(value)
        }
    }

    /// A known, non-zero value of a proto enum.
    pub fn enumeration<T: TryFrom<i32>>(&mut self, field: &str, raw: i32) -> Option<T> {
        if raw == 0 {
            self.add(field, "is required");
            return None;
        }
        T::try_from(raw).map_err(|_| self.add(field, format!("unknown value {raw}"))).ok()
    }

    /// A `YYYY-MM-DD` date.
    pub fn date(&mut self, field: &str, value: &str) -> Option<NaiveDate> {
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map_err(|_| self.add(field, format!("{value:?} is not a YYYY-MM-DD date")))
            .ok()
    }

    /// A UUID-shaped resource id (application, order).
    pub fn resource_id<'a>(&mut self, field: &str, value: &'a str) -> Option<&'a str> {
        let value = self.required(field, value, 64)?;
        let shaped = value.len() == 36 && value.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if shaped {
            Some(value)
        } else {
            self.add(field, format!("{value:?} is not an id (36-character UUID)"));
            None
        }
    }
}
