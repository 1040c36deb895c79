//! The deterministic synthetic population: hundreds of citizens of the two home bureaus, with at
//! least one citizen for every refusal of the rulebook. The same `(date, size)` always gives the
//! same people, so README commands and tests can name them.
use chrono::{Duration, Months, NaiveDate};
use yidi_domain::{Credit, Particulars, Registration};
use yidi_domain::{IdNumber, biometrics::TEMPLATE_LEN, card::term_for};
use yidi_runtime::population::{Citizen, ExistingCard, Population};

use crate::topology::{HOME_JIANGXI, HOME_SICHUAN};

/// Scenario labels (docs/RUNBOOK.md, "Population"): what each labelled citizen demonstrates.
pub const SCENARIOS: &[&str] = &[
    "replacement",
    "renewal",
    "loss_report",
    "withdrawal",
    "loss_report_final",
    "first_application",
    "face_mismatch",
    "fingerprint_mismatch",
    "bad_credit",
    "deceased",
    "agent_not_allowed",
    "document_not_accepted",
    "not_yet_renewable",
    "application_already_open",
    "registration_moved",
];

/// Scenarios only one province has: `not_accepted_here` needs a province not paired with Zhejiang
/// (Sichuan) and the demo started in the pilot phase; `unknown_citizen` is on no register at all.
pub const SICHUAN_ONLY: &[&str] = &["not_accepted_here"];
pub const JIANGXI_ONLY: &[&str] = &["unknown_citizen"];

/// SplitMix64: tiny, deterministic (the same seed, the same sequence), good enough for synthetic
/// data and for repeatable runs (the soak's kills).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn template(&mut self) -> Vec<u8> {
        (0..TEMPLATE_LEN).map(|_| self.next_u64() as u8).collect()
    }
}

const SURNAMES: &[&str] = &["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun"];
const GIVEN: &[&str] =
    &["Wei", "Fang", "Na", "Min", "Jing", "Lei", "Jun", "Yan", "Tao", "Ming", "Hui", "Qiang", "Li", "Xia"];

struct Province {
    code: &'static str,
    bureau: &'static str,
    serial_prefix: &'static str,
    /// Address codes of a few of its counties.
    counties: &'static [&'static str],
    town: &'static str,
}

const JIANGXI: Province = Province {
    code: "36",
    bureau: HOME_JIANGXI,
    serial_prefix: "JX",
    counties: &["360102", "360103", "360402", "360702"],
    town: "Nanchang",
};
const SICHUAN: Province = Province {
    code: "51",
    bureau: HOME_SICHUAN,
    serial_prefix: "SC",
    counties: &["510104", "510105", "510703", "511302"],
    town: "Chengdu",
};

/// Generates `per_province` citizens for each home bureau (at least the labelled scenarios).
pub fn generate(today: NaiveDate, per_province: usize) -> Population {
    generate_with_renewals(today, per_province, 0)
}

/// As [`generate`], with `renewable_per_province` more citizens labelled "renewal" (card inside
/// the renewal window) after the others, for runs that renew many cards (the soak). With 0 it is
/// exactly [`generate`].
pub fn generate_with_renewals(today: NaiveDate, per_province: usize, renewable_per_province: usize) -> Population {
    let mut rng = Rng(0x5EED_1D1D);
    let mut citizens = Vec::new();
    for province in [&JIANGXI, &SICHUAN] {
        let mut labels: Vec<&str> = SCENARIOS.to_vec();
        let extra = if province.code == "51" { SICHUAN_ONLY } else { JIANGXI_ONLY };
        labels.extend_from_slice(extra);
        while labels.len() < per_province {
            labels.push("ordinary");
        }
        labels.extend(std::iter::repeat_n("renewal", renewable_per_province));
        for (index, label) in labels.into_iter().enumerate() {
            citizens.push(citizen(&mut rng, province, index, label, today));
        }
    }
    Population { citizens }
}

fn citizen(rng: &mut Rng, province: &Province, index: usize, scenario: &str, today: NaiveDate) -> Citizen {
    // Adults between 20 and 60, so every card term of C1 occurs.
    let age_days = 365 * 20 + rng.below(365 * 40) as i64;
    let birth = today - Duration::days(age_days);
    let address_code = if scenario == "registration_moved" {
        // Born in Zhejiang, household registration moved to the home province since (N3).
        "330102"
    } else {
        province.counties[rng.below(province.counties.len() as u64) as usize]
    };
    let id_number = IdNumber::compose(address_code, birth, (index % 1000) as u16).to_string();
    let name = format!(
        "{} {}{}",
        SURNAMES[rng.below(SURNAMES.len() as u64) as usize],
        GIVEN[rng.below(GIVEN.len() as u64) as usize],
        GIVEN[rng.below(GIVEN.len() as u64) as usize].to_lowercase()
    );
    let face = rng.template();
    let fingerprint = rng.template();
    let impostor_face = rng.template();
    let impostor_fingerprint = rng.template();
    let serial = format!("{}{:010}", province.serial_prefix, 1_000_000 + index);

    let card = match scenario {
        "first_application" => None,
        "renewal" => {
            // Expires in 30 days: inside the 90-day renewal window (K2).
            let valid_until = today + Duration::days(30);
            let valid_from = valid_until.checked_sub_months(Months::new(20 * 12)).unwrap_or(valid_until);
            Some(ExistingCard { serial, valid_from, valid_until: Some(valid_until), reported_lost: false })
        }
        _ => {
            // Issued within the last two years, so it is valid and not yet renewable.
            let valid_from = today - Duration::days(30 + rng.below(700) as i64);
            let mut valid_until = term_for(birth, valid_from).valid_until;
            if scenario == "not_yet_renewable" && valid_until.is_none() {
                valid_until = valid_from.checked_add_months(Months::new(20 * 12));
            }
            let reported_lost = scenario == "withdrawal";
            Some(ExistingCard { serial, valid_from, valid_until, reported_lost })
        }
    };
    let (live_face, live_fingerprint) = match scenario {
        "face_mismatch" => (impostor_face, impostor_fingerprint),
        "fingerprint_mismatch" => (face.clone(), impostor_fingerprint),
        _ => (face.clone(), fingerprint.clone()),
    };
    Citizen {
        person: Particulars {
            id_number,
            name,
            sex: IdNumber::compose(address_code, birth, (index % 1000) as u16).sex(),
            birth_date: birth,
            registration_province: province.code.to_owned(),
            address: format!("{} {} Road {}", province.town, SURNAMES[index % SURNAMES.len()], 1 + index),
        },
        home_bureau_id: if scenario == "unknown_citizen" { String::new() } else { province.bureau.to_owned() },
        scenario: scenario.to_owned(),
        credit: if scenario == "bad_credit" { Credit::Bad } else { Credit::Good },
        registration: if scenario == "deceased" { Registration::Cancelled } else { Registration::Active },
        card,
        face_template: face,
        fingerprint_template: fingerprint,
        live_face_template: live_face,
        live_fingerprint_template: live_fingerprint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2118, 3, 1).unwrap()
    }

    #[test]
    fn n1_every_generated_number_is_valid_and_unique() {
        let population = generate(today(), 200);
        assert_eq!(population.citizens.len(), 400);
        let mut seen = std::collections::HashSet::new();
        for citizen in &population.citizens {
            assert!(IdNumber::parse(&citizen.person.id_number, today()).is_ok(), "{}", citizen.person.id_number);
            assert!(seen.insert(citizen.person.id_number.clone()), "duplicate {}", citizen.person.id_number);
        }
    }

    #[test]
    fn n3_registration_may_differ_from_the_address_code() {
        let population = generate(today(), 50);
        let moved = population.citizens.iter().find(|c| c.scenario == "registration_moved").unwrap();
        assert_eq!(&moved.person.id_number[..2], "33");
        assert_eq!(moved.person.registration_province, "36");
    }

    #[test]
    fn generation_is_deterministic_and_covers_every_scenario() {
        assert_eq!(generate(today(), 30), generate(today(), 30));
        let population = generate(today(), 30);
        for label in SCENARIOS.iter().chain(SICHUAN_ONLY).chain(JIANGXI_ONLY) {
            assert!(population.citizens.iter().any(|c| c.scenario == *label), "{label}");
        }
    }
}
