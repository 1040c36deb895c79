//! When a station may accept an applicant from another province, and with which documents
//! (P0–P4). The timeline is data: the defaults are the seed's dates, configuration may change them.
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::application::RefusalReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentKind {
    HouseholdRegisterBook,
    ResidencePermit,
    ValidCertificate,
    WorkUnitProof,
}

/// Under which rule a station accepts an applicant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The station is in the applicant's home province: not a "different place".
    Local,
    /// P1: one-to-one pilot pair.
    Pilot,
    /// P2: the station's city opened acceptance for applicants from anywhere.
    CityOpening,
    /// P3: national acceptance.
    National,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CityOpening {
    /// Address-code prefix of the city or province that opened (e.g. "52" Guizhou, "3301" Hangzhou).
    pub region: String,
    pub name: String,
    pub from: NaiveDate,
}

/// Keys left out of a `[policy]` section keep the seed's values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyTimeline {
    /// P1: start of the one-to-one pilot. Before it, P0: nobody applies outside the home province.
    pub pilot_from: NaiveDate,
    /// P1: pairs of two-digit province codes.
    pub pilot_pairs: Vec<[String; 2]>,
    /// P2: cities (or whole provinces) that opened acceptance for applicants from anywhere.
    pub city_openings: Vec<CityOpening>,
    /// P3: national acceptance.
    pub national_from: NaiveDate,
    /// P4: documents accepted under the pilot.
    pub pilot_documents: Vec<DocumentKind>,
    /// P4: documents accepted from P2 on (and at home).
    pub open_documents: Vec<DocumentKind>,
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
}

impl Default for PolicyTimeline {
    /// The seed's dates and pairs.
    fn default() -> Self {
        let pair = |a: &str, b: &str| [a.to_owned(), b.to_owned()];
        Self {
            pilot_from: date(2115, 7, 1),
            pilot_pairs: vec![pair("12", "41"), pair("32", "34"), pair("33", "36"), pair("50", "51"), pair("42", "43")],
            city_openings: vec![CityOpening { region: "52".into(), name: "Guizhou".into(), from: date(2116, 4, 1) }],
            national_from: date(2117, 7, 1),
            pilot_documents: vec![DocumentKind::ValidCertificate, DocumentKind::WorkUnitProof],
            open_documents: vec![DocumentKind::HouseholdRegisterBook, DocumentKind::ResidencePermit],
        }
    }
}

impl PolicyTimeline {
    /// P0–P3: may a station in `station_region` (6-digit address code) accept an applicant whose
    /// household registration is in `home_province` on `day`?
    pub fn phase(&self, station_region: &str, home_province: &str, day: NaiveDate) -> Result<Phase, RefusalReason> {
        if station_region.starts_with(home_province) {
            return Ok(Phase::Local);
        }
        if day >= self.national_from {
            return Ok(Phase::National);
        }
        if self.city_openings.iter().any(|o| station_region.starts_with(&o.region) && day >= o.from) {
            return Ok(Phase::CityOpening);
        }
        let station_province = station_region.get(0..2).unwrap_or_default();
        let paired = self.pilot_pairs.iter().any(|[a, b]| {
            (a == station_province && b == home_province) || (b == station_province && a == home_province)
        });
        if day >= self.pilot_from && paired {
            return Ok(Phase::Pilot);
        }
        Err(RefusalReason::NotAcceptedHere)
    }

    /// P4: is `document` accepted in `phase`?
    pub fn document_accepted(&self, phase: Phase, document: DocumentKind) -> bool {
        match phase {
            Phase::Pilot => self.pilot_documents.contains(&document),
            Phase::CityOpening | Phase::National => self.open_documents.contains(&document),
            Phase::Local => self.open_documents.contains(&document) || self.pilot_documents.contains(&document),
        }
    }

    /// P0–P4 together: the phase, or the refusal.
    pub fn check(
        &self,
        station_region: &str,
        home_province: &str,
        day: NaiveDate,
        document: DocumentKind,
    ) -> Result<Phase, RefusalReason> {
        let phase = self.phase(station_region, home_province, day)?;
        if self.document_accepted(phase, document) { Ok(phase) } else { Err(RefusalReason::DocumentNotAccepted) }
    }

    /// Checks that the timeline makes sense; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.pilot_from > self.national_from {
            return Err("policy.pilot_from must not be after policy.national_from".into());
        }
        for [a, b] in &self.pilot_pairs {
            for code in [a, b] {
                if crate::id_number::province_name(code).is_none() {
                    return Err(format!("policy.pilot_pairs: unknown province code {code:?}"));
                }
            }
        }
        for opening in &self.city_openings {
            if opening.region.len() < 2 || !opening.region.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("policy.city_openings: region {:?} is not an address-code prefix", opening.region));
            }
        }
        if self.open_documents.is_empty() {
            return Err("policy.open_documents must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANGZHOU: &str = "330100"; // Zhejiang station
    const GUIYANG: &str = "520100"; // Guizhou station

    fn policy() -> PolicyTimeline {
        PolicyTimeline::default()
    }

    #[test]
    fn p0_before_the_pilot_nobody_applies_outside_home() {
        let day = date(2115, 6, 30);
        assert_eq!(policy().phase(HANGZHOU, "36", day), Err(RefusalReason::NotAcceptedHere));
        assert_eq!(policy().phase(HANGZHOU, "33", day), Ok(Phase::Local));
    }

    #[test]
    fn p1_pilot_pairs_accept_each_other_from_the_start_date() {
        let day = date(2115, 7, 1);
        assert_eq!(policy().phase(HANGZHOU, "36", day), Ok(Phase::Pilot));
        assert_eq!(policy().phase("360100", "33", day), Ok(Phase::Pilot));
        // Sichuan is paired with Chongqing, not Zhejiang.
        assert_eq!(policy().phase(HANGZHOU, "51", day), Err(RefusalReason::NotAcceptedHere));
    }

    #[test]
    fn p1_pairs_are_data_an_operator_can_extend() {
        let mut policy = policy();
        policy.pilot_pairs.push(["33".into(), "51".into()]);
        assert_eq!(policy.phase(HANGZHOU, "51", date(2115, 8, 1)), Ok(Phase::Pilot));
    }

    #[test]
    fn p2_a_city_opens_for_everyone_at_its_own_date() {
        assert_eq!(policy().phase(GUIYANG, "11", date(2116, 3, 31)), Err(RefusalReason::NotAcceptedHere));
        assert_eq!(policy().phase(GUIYANG, "11", date(2116, 4, 1)), Ok(Phase::CityOpening));
        // Other cities are still closed.
        assert_eq!(policy().phase(HANGZHOU, "11", date(2116, 4, 1)), Err(RefusalReason::NotAcceptedHere));
    }

    #[test]
    fn p3_national_acceptance_from_2117_07_01() {
        assert_eq!(policy().phase(HANGZHOU, "11", date(2117, 6, 30)), Err(RefusalReason::NotAcceptedHere));
        assert_eq!(policy().phase(HANGZHOU, "11", date(2117, 7, 1)), Ok(Phase::National));
    }

    #[test]
    fn p4_documents_depend_on_the_phase() {
        let pilot = date(2115, 9, 1);
        let check = |doc| policy().check(HANGZHOU, "36", pilot, doc);
        assert_eq!(check(DocumentKind::WorkUnitProof), Ok(Phase::Pilot));
        assert_eq!(check(DocumentKind::ValidCertificate), Ok(Phase::Pilot));
        assert_eq!(check(DocumentKind::HouseholdRegisterBook), Err(RefusalReason::DocumentNotAccepted));
        let national = date(2118, 1, 1);
        let check = |doc| policy().check(HANGZHOU, "36", national, doc);
        assert_eq!(check(DocumentKind::HouseholdRegisterBook), Ok(Phase::National));
        assert_eq!(check(DocumentKind::ResidencePermit), Ok(Phase::National));
        assert_eq!(check(DocumentKind::WorkUnitProof), Err(RefusalReason::DocumentNotAccepted));
    }

    #[test]
    fn p4_default_timeline_validates_and_a_bad_one_names_the_key() {
        assert_eq!(policy().validate(), Ok(()));
        let mut bad = policy();
        bad.pilot_pairs.push(["33".into(), "99".into()]);
        assert!(bad.validate().unwrap_err().contains("policy.pilot_pairs"));
    }
}
