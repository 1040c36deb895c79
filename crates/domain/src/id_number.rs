//! Citizen identity numbers (GB 11643-1999): rules N1, N2, N3.
use std::fmt;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// N2: weights of the first 17 digits.
const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// N2: check character indexed by the weighted sum mod 11.
const CHECK_CHARACTERS: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];

/// N3: province-level codes (first two digits) and their names.
pub const PROVINCES: &[(&str, &str)] = &[
    ("11", "Beijing"),
    ("12", "Tianjin"),
    ("13", "Hebei"),
    ("14", "Shanxi"),
    ("15", "Inner Mongolia"),
    ("21", "Liaoning"),
    ("22", "Jilin"),
    ("23", "Heilongjiang"),
    ("31", "Shanghai"),
    ("32", "Jiangsu"),
    ("33", "Zhejiang"),
    ("34", "Anhui"),
    ("35", "Fujian"),
    ("36", "Jiangxi"),
    ("37", "Shandong"),
    ("41", "Henan"),
    ("42", "Hubei"),
    ("43", "Hunan"),
    ("44", "Guangdong"),
    ("45", "Guangxi"),
    ("46", "Hainan"),
    ("50", "Chongqing"),
    ("51", "Sichuan"),
    ("52", "Guizhou"),
    ("53", "Yunnan"),
    ("54", "Tibet"),
    ("61", "Shaanxi"),
    ("62", "Gansu"),
    ("63", "Qinghai"),
    ("64", "Ningxia"),
    ("65", "Xinjiang"),
];

/// The name of a two-digit province code, if it is one (N3).
pub fn province_name(code: &str) -> Option<&'static str> {
    PROVINCES.iter().find(|(c, _)| *c == code).map(|(_, name)| *name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    Male,
    Female,
}

/// Why a string is not a valid identity number. The message names the reason for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdNumberError {
    #[error("must be 18 characters, found {found}")]
    Length { found: usize },
    #[error("character {position} must be a digit{}", if *.position == 18 { " or X" } else { "" })]
    Character { position: usize },
    #[error("address code starts with unknown province {province}")]
    UnknownProvince { province: String },
    #[error("birth date {digits} is not a real date")]
    BirthDate { digits: String },
    #[error("birth date {date} is in the future")]
    FutureBirthDate { date: NaiveDate },
    #[error("check character must be {expected}, found {found}")]
    CheckCharacter { expected: char, found: char },
}

/// The date of eight ASCII digits `YYYYMMDD`, if there is one. Read by hand: chrono's format
/// parser cost a check about as much as the rest of the number's validation (every CheckCard and
/// every card of a CheckCards batch parses a number).
fn birth_date_of(digits: &str) -> Option<NaiveDate> {
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = digits.get(range)?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.bytes().fold(0, |n, b| n * 10 + u32::from(b - b'0')))
    };
    if digits.len() != 8 {
        return None;
    }
    NaiveDate::from_ymd_opt(i32::try_from(number(0..4)?).ok()?, number(4..6)?, number(6..8)?)
}

/// A valid, normalised (upper-case `X`) 18-character identity number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdNumber(String);

impl IdNumber {
    /// Parses and validates `input` (N1, N2, N3) against `today` (the injected clock's date).
    pub fn parse(input: &str, today: NaiveDate) -> Result<Self, IdNumberError> {
        let normalised = input.trim().to_ascii_uppercase();
        let found = normalised.chars().count();
        if found != 18 {
            return Err(IdNumberError::Length { found });
        }
        let bytes = normalised.as_bytes();
        for (index, byte) in bytes.iter().enumerate() {
            let is_last = index == 17;
            if !(byte.is_ascii_digit() || (is_last && *byte == b'X')) {
                return Err(IdNumberError::Character { position: index + 1 });
            }
        }
        let province = &normalised[0..2];
        if province_name(province).is_none() {
            return Err(IdNumberError::UnknownProvince { province: province.to_owned() });
        }
        let birth_digits = &normalised[6..14];
        let birth =
            birth_date_of(birth_digits).ok_or_else(|| IdNumberError::BirthDate { digits: birth_digits.to_owned() })?;
        if birth > today {
            return Err(IdNumberError::FutureBirthDate { date: birth });
        }
        let expected = check_character(&normalised[0..17]);
        let found = bytes[17] as char;
        if expected != found {
            return Err(IdNumberError::CheckCharacter { expected, found });
        }
        Ok(Self(normalised))
    }

    /// Builds a valid number from its parts; for synthetic populations and tests.
    pub fn compose(address_code: &str, birth: NaiveDate, sequence: u16) -> Self {
        let first17 = format!("{address_code:0>6.6}{}{:03}", birth.format("%Y%m%d"), sequence % 1000);
        let check = check_character(&first17);
        Self(format!("{first17}{check}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// N3: the two-digit province code of the address code.
    pub fn province_code(&self) -> &str {
        &self.0[0..2]
    }

    pub fn address_code(&self) -> &str {
        &self.0[0..6]
    }

    pub fn birth_date(&self) -> NaiveDate {
        // Validated in `parse`/`compose`; the fallback is unreachable for a constructed value.
        birth_date_of(&self.0[6..14]).unwrap_or_default()
    }

    /// N1: odd sequence is male, even female.
    pub fn sex(&self) -> Sex {
        let digit = self.0.as_bytes()[16] - b'0';
        if digit % 2 == 1 { Sex::Male } else { Sex::Female }
    }

    /// The number with the birth date and sequence hidden, for logs and operator screens.
    pub fn masked(&self) -> String {
        crate::mask::mask_id_number(&self.0)
    }
}

impl fmt::Display for IdNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// N2: the check character of the first 17 digits. `first17` must be 17 ASCII digits.
pub fn check_character(first17: &str) -> char {
    let sum: u32 = first17.bytes().zip(WEIGHTS).map(|(digit, weight)| u32::from(digit - b'0') * weight).sum();
    CHECK_CHARACTERS[(sum % 11) as usize]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2118, 1, 1).unwrap()
    }

    #[test]
    fn n1_a_well_formed_number_is_accepted_and_read() {
        let id = IdNumber::compose("330102", NaiveDate::from_ymd_opt(1990, 3, 7).unwrap(), 123);
        let parsed = IdNumber::parse(id.as_str(), today()).unwrap();
        assert_eq!(parsed.province_code(), "33");
        assert_eq!(parsed.birth_date(), NaiveDate::from_ymd_opt(1990, 3, 7).unwrap());
        assert_eq!(parsed.sex(), Sex::Male);
    }

    #[test]
    fn n1_wrong_length_is_refused() {
        assert_eq!(IdNumber::parse("33010219900307123", today()), Err(IdNumberError::Length { found: 17 }));
        assert_eq!(IdNumber::parse("3301021990030712345", today()), Err(IdNumberError::Length { found: 19 }));
    }

    #[test]
    fn n1_letters_are_refused_except_the_final_x() {
        assert_eq!(IdNumber::parse("33010219900307A234", today()), Err(IdNumberError::Character { position: 15 }));
    }

    #[test]
    fn n1_impossible_birth_date_is_refused() {
        // 1990-02-30 does not exist; the check character is made right so only the date is wrong.
        let first17 = "33010219900230123";
        let id = format!("{first17}{}", check_character(first17));
        assert!(matches!(IdNumber::parse(&id, today()), Err(IdNumberError::BirthDate { .. })));
    }

    #[test]
    fn n1_birth_date_in_the_future_is_refused() {
        let id = IdNumber::compose("330102", NaiveDate::from_ymd_opt(2118, 1, 2).unwrap(), 1);
        assert!(matches!(IdNumber::parse(id.as_str(), today()), Err(IdNumberError::FutureBirthDate { .. })));
    }

    #[test]
    fn n1_sequence_parity_gives_sex() {
        let birth = NaiveDate::from_ymd_opt(1980, 1, 1).unwrap();
        assert_eq!(IdNumber::compose("330102", birth, 2).sex(), Sex::Female);
        assert_eq!(IdNumber::compose("330102", birth, 3).sex(), Sex::Male);
    }

    #[test]
    fn n2_known_number_has_the_published_check_character() {
        // The example number of GB 11643-1999: 11010519491231002X.
        assert_eq!(check_character("11010519491231002"), 'X');
        assert!(IdNumber::parse("11010519491231002X", today()).is_ok());
    }

    #[test]
    fn n2_wrong_check_character_is_refused() {
        assert_eq!(
            IdNumber::parse("110105194912310021", today()),
            Err(IdNumberError::CheckCharacter { expected: 'X', found: '1' })
        );
    }

    #[test]
    fn n2_lower_case_x_is_normalised() {
        assert_eq!(IdNumber::parse("11010519491231002x", today()).unwrap().as_str(), "11010519491231002X");
    }

    #[test]
    fn n3_province_code_is_read_and_unknown_provinces_refused() {
        assert_eq!(province_name("52"), Some("Guizhou"));
        let first17 = "99010219900307123";
        let id = format!("{first17}{}", check_character(first17));
        assert_eq!(IdNumber::parse(&id, today()), Err(IdNumberError::UnknownProvince { province: "99".into() }));
    }

    fn birth_dates() -> impl Strategy<Value = NaiveDate> {
        (0i64..60_000).prop_map(|days| NaiveDate::from_ymd_opt(1900, 1, 1).unwrap() + chrono::Duration::days(days))
    }

    fn address_codes() -> impl Strategy<Value = String> {
        (0..PROVINCES.len(), 0u32..10_000).prop_map(|(p, rest)| format!("{}{rest:04}", PROVINCES[p].0))
    }

    proptest! {
        #[test]
        fn n1_composed_numbers_always_parse_back(address in address_codes(), birth in birth_dates(), seq in 0u16..1000) {
            let id = IdNumber::compose(&address, birth, seq);
            let parsed = IdNumber::parse(id.as_str(), today()).unwrap();
            prop_assert_eq!(parsed.birth_date(), birth);
            prop_assert_eq!(parsed.address_code(), address.as_str());
            prop_assert_eq!(parsed.sex() == Sex::Male, seq % 2 == 1);
        }

        #[test]
        fn n2_any_single_digit_change_is_detected(address in address_codes(), birth in birth_dates(), seq in 0u16..1000, position in 0usize..17, delta in 1u8..10) {
            let id = IdNumber::compose(&address, birth, seq);
            let mut bytes = id.as_str().as_bytes().to_vec();
            bytes[position] = b'0' + (bytes[position] - b'0' + delta) % 10;
            let altered = String::from_utf8(bytes).unwrap();
            prop_assert!(IdNumber::parse(&altered, today()).is_err());
        }

        #[test]
        fn n1_arbitrary_strings_never_panic(input in "\\PC{0,30}") {
            let _ = IdNumber::parse(&input, today());
        }
    }

    #[test]
    fn n2_the_birth_date_is_read_as_chrono_reads_it() {
        for digits in ["19900307", "20000229", "19000229", "20240230", "20231301", "00000101", "1990030", "1990a307"] {
            assert_eq!(
                birth_date_of(digits),
                NaiveDate::parse_from_str(digits, "%Y%m%d").ok().filter(|_| digits.len() == 8),
                "{digits}"
            );
        }
    }
}
