//! The card: validity by age (C1), the renewal window (K2) and the status a relying party sees (C2).
use chrono::{Datelike, Months, NaiveDate};
use serde::{Deserialize, Serialize};

/// The days before expiry from which a card may be renewed (K2).
pub const RENEWAL_WINDOW_DAYS: i64 = 90;

/// What a relying party is told about a card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardStatus {
    Valid,
    ReportedLost,
    Revoked,
    Expired,
    Unknown,
    /// C3: made and registered, not yet handed over to its holder: not valid yet.
    AwaitingCollection,
    /// C3: made but never collected within the deadline; it never becomes valid.
    Voided,
}

/// The status the registry stores; `Expired` is derived from the date, `Unknown` from absence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredCardStatus {
    Valid,
    ReportedLost,
    Revoked,
    /// C3: made and registered by its producer, not yet handed over (answered AWAITING_COLLECTION).
    Made,
    /// C3: not collected within the deadline.
    Voided,
}

impl StoredCardStatus {
    pub const ALL: [Self; 5] = [Self::Valid, Self::ReportedLost, Self::Revoked, Self::Made, Self::Voided];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::ReportedLost => "reported_lost",
            Self::Revoked => "revoked",
            Self::Made => "made",
            Self::Voided => "voided",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// S1: the cards a collection revokes: every other card of the holder that is or may still
    /// become valid.
    pub fn superseded_by_collection(self) -> bool {
        matches!(self, Self::Valid | Self::ReportedLost | Self::Made)
    }

    /// C2: the status on `today` of a card stored with this status and expiry (None: long-term).
    /// A card reported lost or revoked stays so after its expiry: that is the stronger answer.
    pub fn effective(self, valid_until: Option<NaiveDate>, today: NaiveDate) -> CardStatus {
        match self {
            Self::ReportedLost => CardStatus::ReportedLost,
            Self::Revoked => CardStatus::Revoked,
            Self::Made => CardStatus::AwaitingCollection,
            Self::Voided => CardStatus::Voided,
            Self::Valid if valid_until.is_some_and(|until| today > until) => CardStatus::Expired,
            Self::Valid => CardStatus::Valid,
        }
    }

    /// K6: a loss report can be withdrawn; a revocation is final. C3: a card awaiting collection
    /// becomes valid when handed over, void when never collected, revoked when a newer card is.
    pub fn can_move_to(self, next: Self) -> bool {
        matches!(
            (self, next),
            (Self::Valid, Self::ReportedLost)
                | (Self::ReportedLost, Self::Valid)
                | (Self::Valid | Self::ReportedLost | Self::Made, Self::Revoked)
                | (Self::Made, Self::Valid | Self::Voided)
        )
    }
}

/// The validity period of a card made on `valid_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardTerm {
    pub valid_from: NaiveDate,
    /// None: long-term.
    pub valid_until: Option<NaiveDate>,
}

/// Full years of age on `day`: the years whose birthday has come by `day`.
pub fn age_on(birth: NaiveDate, day: NaiveDate) -> u32 {
    let mut age = day.year() - birth.year();
    if day < birthday_in(birth, day.year()) {
        age -= 1;
    }
    u32::try_from(age).unwrap_or(0)
}

/// The birthday in `year`. Someone born on 29 February has their birthday on 28 February in a
/// common year: a period of years with no corresponding day ends on the last day of that month
/// (Civil Code of the PRC, art. 202), the same rule that ends a card valid from 29 February on
/// 28 February ([`term_for`]).
pub fn birthday_in(birth: NaiveDate, year: i32) -> NaiveDate {
    let leap_day = (birth.month(), birth.day()) == (2, 29);
    let (month, day) =
        if leap_day && NaiveDate::from_ymd_opt(year, 2, 29).is_none() { (2, 28) } else { (birth.month(), birth.day()) };
    // Only 29 February lacks a day in some years, and it is mapped above; keep `birth` if the year is out of range.
    NaiveDate::from_ymd_opt(year, month, day).unwrap_or(birth)
}

/// C1: under 16 → 5 years; 16–25 → 10; 26–45 → 20; 46 and over → long-term.
pub fn validity_years(age: u32) -> Option<u32> {
    match age {
        0..=15 => Some(5),
        16..=25 => Some(10),
        26..=45 => Some(20),
        _ => None,
    }
}

/// C1: the term of a card issued on `issue_day` to a holder born on `birth`.
/// A card valid from 29 February ends on 28 February of a common year.
pub fn term_for(birth: NaiveDate, issue_day: NaiveDate) -> CardTerm {
    let valid_until = validity_years(age_on(birth, issue_day))
        .and_then(|years| issue_day.checked_add_months(Months::new(years * 12)));
    CardTerm { valid_from: issue_day, valid_until }
}

/// K2: renewal is allowed from 90 days before expiry on, and after expiry; never for long-term cards.
pub fn renewable(valid_until: Option<NaiveDate>, today: NaiveDate) -> bool {
    valid_until.is_some_and(|until| (until - today).num_days() <= RENEWAL_WINDOW_DAYS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn c1_validity_by_age_on_the_day_of_issue() {
        let issue = d(2118, 1, 1);
        assert_eq!(term_for(d(2103, 1, 2), issue).valid_until, Some(d(2123, 1, 1)), "age 14: 5 years");
        assert_eq!(term_for(d(2102, 1, 1), issue).valid_until, Some(d(2128, 1, 1)), "age 16: 10 years");
        assert_eq!(term_for(d(2092, 1, 2), issue).valid_until, Some(d(2128, 1, 1)), "age 25: 10 years");
        assert_eq!(term_for(d(2092, 1, 1), issue).valid_until, Some(d(2138, 1, 1)), "age 26: 20 years");
        assert_eq!(term_for(d(2072, 1, 2), issue).valid_until, Some(d(2138, 1, 1)), "age 45: 20 years");
        assert_eq!(term_for(d(2072, 1, 1), issue).valid_until, None, "age 46: long-term");
    }

    #[test]
    fn c1_leap_day_issue_ends_on_28_february() {
        assert_eq!(term_for(d(2080, 6, 1), d(2116, 2, 29)).valid_until, Some(d(2136, 2, 29)));
        assert_eq!(term_for(d(2100, 6, 1), d(2116, 2, 29)).valid_until, Some(d(2121, 2, 28)));
    }

    #[test]
    fn c1_leap_day_birthday_is_28_february_in_a_common_year() {
        assert_eq!(birthday_in(d(2096, 2, 29), 2117), d(2117, 2, 28));
        assert_eq!(birthday_in(d(2096, 2, 29), 2116), d(2116, 2, 29));
        assert_eq!(birthday_in(d(2096, 3, 1), 2117), d(2117, 3, 1));
        // 2100 is a common year (a century not divisible by 400).
        assert_eq!(birthday_in(d(2084, 2, 29), 2100), d(2100, 2, 28));
        assert_eq!(age_on(d(2096, 2, 29), d(2117, 2, 27)), 20);
        assert_eq!(age_on(d(2096, 2, 29), d(2117, 2, 28)), 21);
        assert_eq!(age_on(d(2096, 2, 29), d(2117, 3, 1)), 21);
        assert_eq!(age_on(d(2096, 2, 29), d(2116, 2, 28)), 19, "in a leap year the birthday is 29 February");
        assert_eq!(age_on(d(2096, 2, 29), d(2116, 2, 29)), 20);
    }

    #[test]
    fn c1_leap_day_birth_turns_16_26_and_46_on_28_february() {
        let until = |birth, issue| term_for(birth, issue).valid_until;
        // 16: a leap year 16 years on is a leap year too, except across a common century year.
        let born = d(2084, 2, 29);
        assert_eq!(until(born, d(2100, 2, 27)), Some(d(2105, 2, 27)), "15 the day before: 5 years");
        assert_eq!(until(born, d(2100, 2, 28)), Some(d(2110, 2, 28)), "16 on 28 February: 10 years");
        let born = d(2096, 2, 29);
        assert_eq!(until(born, d(2112, 2, 28)), Some(d(2117, 2, 28)), "leap year: still 15 on 28 February");
        assert_eq!(until(born, d(2112, 2, 29)), Some(d(2122, 2, 28)), "leap year: 16 on 29 February");
        // 26
        let born = d(2092, 2, 29);
        assert_eq!(until(born, d(2118, 2, 27)), Some(d(2128, 2, 27)), "25 the day before: 10 years");
        assert_eq!(until(born, d(2118, 2, 28)), Some(d(2138, 2, 28)), "26 on 28 February: 20 years");
        // 46
        let born = d(2072, 2, 29);
        assert_eq!(until(born, d(2118, 2, 27)), Some(d(2138, 2, 27)), "45 the day before: 20 years");
        assert_eq!(until(born, d(2118, 2, 28)), None, "46 on 28 February: long-term");
        assert_eq!(until(born, d(2118, 3, 1)), None);
    }

    #[test]
    fn k2_renewal_window_opens_90_days_before_expiry() {
        let until = Some(d(2118, 4, 1));
        assert!(!renewable(until, d(2117, 12, 31)), "91 days before");
        assert!(renewable(until, d(2118, 1, 1)), "90 days before");
        assert!(renewable(until, d(2119, 1, 1)), "already expired");
        assert!(!renewable(None, d(2118, 1, 1)), "long-term cards are never renewed");
    }

    #[test]
    fn c2_status_is_derived_from_stored_status_and_date() {
        let until = Some(d(2118, 1, 1));
        assert_eq!(StoredCardStatus::Valid.effective(until, d(2118, 1, 1)), CardStatus::Valid);
        assert_eq!(StoredCardStatus::Valid.effective(until, d(2118, 1, 2)), CardStatus::Expired);
        assert_eq!(StoredCardStatus::Valid.effective(None, d(2200, 1, 1)), CardStatus::Valid);
        assert_eq!(StoredCardStatus::ReportedLost.effective(until, d(2119, 1, 1)), CardStatus::ReportedLost);
        assert_eq!(StoredCardStatus::Revoked.effective(None, d(2118, 1, 1)), CardStatus::Revoked);
    }

    #[test]
    fn k6_reported_lost_is_reversible_revoked_is_final() {
        use StoredCardStatus::*;
        assert!(Valid.can_move_to(ReportedLost));
        assert!(ReportedLost.can_move_to(Valid));
        assert!(ReportedLost.can_move_to(Revoked));
        assert!(!Revoked.can_move_to(Valid));
        assert!(!Revoked.can_move_to(ReportedLost));
    }

    #[test]
    fn c3_a_card_awaiting_collection_is_not_valid_until_handed_over() {
        use StoredCardStatus::*;
        let until = Some(d(2138, 1, 1));
        assert_eq!(Made.effective(until, d(2118, 1, 1)), CardStatus::AwaitingCollection);
        assert_eq!(Voided.effective(until, d(2118, 1, 1)), CardStatus::Voided);
        assert_eq!(Voided.effective(until, d(2139, 1, 1)), CardStatus::Voided, "void stays void after expiry");
        assert!(Made.can_move_to(Valid), "collected");
        assert!(Made.can_move_to(Voided), "never collected");
        assert!(Made.can_move_to(Revoked), "a newer card was collected");
        assert!(!Made.can_move_to(ReportedLost), "the holder never had it");
        assert!(!Voided.can_move_to(Valid), "void is final");
        assert!(!Valid.can_move_to(Made));
        let superseded: Vec<_> = StoredCardStatus::ALL.into_iter().filter(|s| s.superseded_by_collection()).collect();
        assert_eq!(superseded, [Valid, ReportedLost, Made]);
        for status in StoredCardStatus::ALL {
            assert_eq!(StoredCardStatus::parse(status.as_str()), Some(status));
        }
    }
}
