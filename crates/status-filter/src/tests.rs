use chrono::{DateTime, Duration, TimeZone, Utc};
use ed25519_dalek::SigningKey;
use yidi_domain::{Bureau, BureauKey, Directory, Role};

use crate::*;

const REGISTRY: &str = "registry-national";

fn at(hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2118, 3, 1, hour, 0, 0).unwrap()
}

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A directory whose registry lists key `k1` (seed 7), valid from `from`, retired at `until`.
fn directory(from: DateTime<Utc>, until: Option<DateTime<Utc>>) -> Directory {
    let key =
        BureauKey { id: "k1".into(), public_key: signing_key(7).verifying_key(), valid_from: from, valid_until: until };
    Directory::new(vec![Bureau::new(REGISTRY, Role::Registry).with_keys(vec![key])]).unwrap()
}

/// A pseudo-random population over a few provinces: number, serial, valid (about 1% not).
fn population(cards: usize, salt: u64) -> Vec<(String, String, bool)> {
    let provinces = ["11", "33", "36", "44", "51"];
    (0..cards)
        .map(|i| {
            let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
            let province = provinces[(x % provinces.len() as u64) as usize];
            let id = format!("{province}0102{:010}{}", (x >> 8) % 10_000_000_000, x % 10);
            let serial = format!("S{salt:02}{i:010}");
            (id, serial, !(x >> 20).is_multiple_of(100))
        })
        .collect()
}

fn filter_cards(people: &[(String, String, bool)]) -> Vec<FilterCard> {
    people.iter().map(|(id, serial, valid)| FilterCard { key: CardKey::new(id, serial), valid: *valid }).collect()
}

fn snapshot(filter: Filter, sequence: u64, built_at: DateTime<Utc>) -> StatusFile {
    StatusFile {
        header: Header {
            kind: Kind::Snapshot,
            registry_id: REGISTRY.into(),
            key_id: "k1".into(),
            from_sequence: sequence,
            sequence,
            built_at,
            usable_until: built_at + Duration::days(7),
        },
        filter,
        ask_online: Vec::new(),
    }
}

#[test]
fn every_covered_card_is_answered_exactly_and_never_registered_pairs_are_rarely_covered() {
    let people = population(20_000, 1);
    let filter = Filter::build(&filter_cards(&people), 20);
    for (id, serial, valid) in &people {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(filter.lookup(&CardKey::new(id, serial)), expected, "{serial}");
    }
    // Never registered: other serials, and registered serials under other numbers.
    let strangers = population(50_000, 2);
    let mut covered = 0;
    for (i, (id, serial, _)) in strangers.iter().enumerate() {
        let serial = if i % 2 == 0 { serial.clone() } else { people[i % people.len()].1.clone() };
        if filter.lookup(&CardKey::new(id, &serial)) != Lookup::NotCovered {
            covered += 1;
        }
    }
    // 2^-20 per pair: 0.05 expected of 50,000.
    assert!(covered <= 2, "{covered} never-registered pairs covered");
}

#[test]
fn numbers_are_normalised_and_blocks_are_provinces() {
    let key = CardKey::new(" 36010219900307123x ", "JX1");
    assert_eq!(key, CardKey::new("36010219900307123X", "JX1"));
    assert_eq!(key.block(), b"36");
    assert_ne!(key, CardKey::new("36010219900307123X", "JX2"));
    assert_eq!(CardKey::new("legacy", "JX1").block(), b"--");
}

#[test]
fn blocks_with_only_lost_cards_or_none_are_exact_too() {
    let cards = [
        ("110102199001010011", "A1", false),
        ("110102199001010012", "A2", false),
        ("330102199001010013", "B1", true),
        ("510102199001010014", "C1", false),
        ("510102199001010015", "C2", true),
        ("510102199001010016", "C3", false),
    ];
    let people: Vec<_> = cards.iter().map(|(id, s, v)| (id.to_string(), s.to_string(), *v)).collect();
    let filter = Filter::build(&filter_cards(&people), 16);
    for (id, serial, valid) in &people {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(filter.lookup(&CardKey::new(id, serial)), expected, "{serial}");
    }
    let empty = Filter::build(&[], 16);
    assert_eq!(empty.lookup(&CardKey::new("110102199001010011", "A1")), Lookup::NotCovered);
}

#[test]
fn a_signed_snapshot_round_trips_and_one_changed_byte_is_refused() {
    let people = population(2_000, 3);
    let file = snapshot(Filter::build(&filter_cards(&people), 16), 42, at(9));
    let bytes = file.sign(&signing_key(7));
    let dir = directory(at(0), None);
    let read = StatusFile::verify(&bytes, &dir).unwrap();
    assert_eq!(read.header, file.header);
    for (id, serial, valid) in &people {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(read.find(&CardKey::new(id, serial)), Some(expected));
    }
    // Every byte matters: header, filter, signature.
    for position in (0..bytes.len()).step_by(bytes.len() / 97 + 1).chain([bytes.len() - 1]) {
        let mut altered = bytes.clone();
        altered[position] ^= 0x01;
        assert!(StatusFile::verify(&altered, &dir).is_err(), "byte {position} changed and accepted");
    }
    assert!(StatusFile::verify(&bytes[..bytes.len() - 1], &dir).is_err());
    assert!(StatusFile::verify(&[], &dir).is_err());
    let other = snapshot(Filter::build(&filter_cards(&people), 16), 42, at(9)).sign(&signing_key(8));
    assert_eq!(StatusFile::verify(&other, &dir).err(), Some(VerifyError::BadSignature));
}

#[test]
fn a_snapshot_signed_by_a_retired_or_unknown_key_is_refused() {
    let bytes = snapshot(Filter::build(&filter_cards(&population(100, 4)), 16), 1, at(9)).sign(&signing_key(7));
    assert!(StatusFile::verify(&bytes, &directory(at(0), Some(at(10)))).is_ok(), "made before retirement");
    let retired = StatusFile::verify(&bytes, &directory(at(0), Some(at(8)))).err();
    assert_eq!(retired, Some(VerifyError::KeyNotValid { key_id: "k1".into() }));
    let not_yet = StatusFile::verify(&bytes, &directory(at(10), None)).err();
    assert_eq!(not_yet, Some(VerifyError::KeyNotValid { key_id: "k1".into() }));
    let nobody = Directory::new(vec![]).unwrap();
    assert_eq!(StatusFile::verify(&bytes, &nobody).err(), Some(VerifyError::UnknownRegistry(REGISTRY.into())));
}

fn delta(
    from: u64,
    to: u64,
    built_at: DateTime<Utc>,
    cards: &[(String, String, bool)],
    ask: &[&(String, String, bool)],
) -> StatusFile {
    let mut filter_input = filter_cards(cards);
    filter_input.extend(ask.iter().map(|(id, s, _)| FilterCard { key: CardKey::new(id, s), valid: false }));
    let mut ask_online: Vec<[u8; 32]> = ask.iter().map(|(id, s, _)| *CardKey::new(id, s).digest()).collect();
    ask_online.sort();
    StatusFile {
        header: Header {
            kind: Kind::Delta,
            registry_id: REGISTRY.into(),
            key_id: "k1".into(),
            from_sequence: from,
            sequence: to,
            built_at,
            usable_until: built_at + Duration::days(7),
        },
        filter: Filter::build_one_block(&filter_input, 16),
        ask_online,
    }
}

#[test]
fn deltas_override_the_snapshot_in_order_and_must_chain() {
    let dir = directory(at(0), None);
    let people = population(1_000, 5);
    let snap =
        StatusFile::verify(&snapshot(Filter::build(&filter_cards(&people), 16), 10, at(9)).sign(&signing_key(7)), &dir)
            .unwrap();
    let mut view = StatusView::new(snap).unwrap();
    let (id, serial, valid) = people.iter().find(|p| p.2).unwrap().clone();
    let key = CardKey::new(&id, &serial);
    assert!(valid);
    assert_eq!(view.lookup(&key), Lookup::Valid);
    let lost = delta(10, 12, at(10), &[(id.clone(), serial.clone(), false)], &[]);
    view.apply(StatusFile::verify(&lost.sign(&signing_key(7)), &dir).unwrap()).unwrap();
    assert_eq!(view.lookup(&key), Lookup::NotValid);
    assert_eq!((view.sequence(), view.as_of()), (12, at(10)));
    let gap = delta(13, 14, at(11), &[], &[]);
    assert_eq!(view.apply(gap).err(), Some(ChainError::Gap { from: 13, at: 12 }));
    let empty = delta(12, 12, at(11), &[], &[]);
    view.apply(empty).unwrap();
    assert_eq!((view.sequence(), view.as_of()), (12, at(11)));
    assert_eq!(view.lookup(&key), Lookup::NotValid, "an empty delta changes nothing");
    let found = (id.clone(), serial.clone(), true);
    view.apply(delta(12, 13, at(12), std::slice::from_ref(&found), &[])).unwrap();
    assert_eq!(view.lookup(&key), Lookup::Valid);
    view.apply(delta(13, 14, at(13), &[], &[&found])).unwrap();
    assert_eq!(view.lookup(&key), Lookup::NotCovered, "about to expire: ask online");
    let untouched = people.iter().find(|p| p.1 != serial).unwrap();
    let expected = if untouched.2 { Lookup::Valid } else { Lookup::NotValid };
    assert_eq!(view.lookup(&CardKey::new(&untouched.0, &untouched.1)), expected);
}

/// 1,000 changes over every province, as a minute of a nation's changes are.
fn changes_over_every_province() -> Vec<(String, String, bool)> {
    let provinces = [
        "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41", "42", "43",
        "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65", "71", "81", "82",
    ];
    (0..1000usize)
        .map(|i| (format!("{}0102{i:012}", provinces[i % provinces.len()]), format!("D{i:011}"), i % 2 == 0))
        .collect()
}

#[test]
fn a_one_block_delta_answers_as_exactly_round_trips_signed_and_is_half_the_size() {
    let changes = changes_over_every_province();
    let one = Filter::build_one_block(&filter_cards(&changes), 24);
    let by_province = Filter::build(&filter_cards(&changes), 24);
    for (id, serial, valid) in &changes {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(one.lookup(&CardKey::new(id, serial)), expected, "{serial}");
    }
    let (mut one_bytes, mut by_province_bytes, mut as_before) = (Vec::new(), Vec::new(), Vec::new());
    one.encode(&mut one_bytes);
    // Deltas signed before varint sizes (presence 2) still read, with the same answers.
    one.encode_as_presence_2(&mut as_before);
    assert!(one_bytes.len() + 200 < as_before.len(), "{} vs {}", one_bytes.len(), as_before.len());
    let before = Filter::decode(&mut crate::wire::Reader::new(&as_before)).unwrap();
    for (id, serial, valid) in &changes {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(before.lookup(&CardKey::new(id, serial)), expected, "{serial}");
    }
    by_province.encode(&mut by_province_bytes);
    assert!(
        2 * one_bytes.len() < by_province_bytes.len() + by_province_bytes.len() / 5,
        "{} vs {}",
        one_bytes.len(),
        by_province_bytes.len()
    );
    let signed = delta(0, 1, at(9), &changes, &[]).sign(&signing_key(7));
    // Issue 16's target: at most 4 kB per 1,000 changes (24 coverage bits as the registry's default).
    let at_24_bits = StatusFile { filter: one, ..delta(0, 1, at(9), &[], &[]) }.sign(&signing_key(7));
    eprintln!("a delta of 1,000 changes at 24 coverage bits: {} bytes signed", at_24_bits.len());
    assert!(at_24_bits.len() <= 4_000, "{} bytes signed", at_24_bits.len());
    let file = StatusFile::verify(&signed, &directory(at(0), None)).unwrap();
    for (id, serial, valid) in &changes {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(file.find(&CardKey::new(id, serial)), Some(expected), "{serial}");
    }
}

#[test]
fn a_filter_built_one_province_at_a_time_answers_as_the_joint_one_and_round_trips_signed() {
    let people = population(20_000, 3);
    let cards = filter_cards(&people);
    let mut builder = FilterBuilder::new(20);
    for province in ["11", "33", "36", "44", "51"] {
        let of_province: Vec<FilterCard> =
            cards.iter().zip(&people).filter(|(_, (id, _, _))| id.starts_with(province)).map(|(c, _)| *c).collect();
        builder.add_province(&of_province).unwrap();
    }
    let again = cards.iter().zip(&people).find(|(_, (id, _, _))| id.starts_with("33")).map(|(c, _)| *c).unwrap();
    assert_eq!(builder.add_province(&[again]), Err(ProvinceAgain("33".into())));
    let separate = builder.finish();
    assert_eq!(separate.counts(), (20_000, people.iter().filter(|(_, _, valid)| !valid).count() as u64));
    let signed = snapshot(separate, 5, at(9)).sign(&signing_key(7));
    let file = StatusFile::verify(&signed, &directory(at(0), None)).unwrap();
    for (id, serial, valid) in &people {
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        assert_eq!(file.find(&CardKey::new(id, serial)), Some(expected), "{serial}");
    }
    // A province the snapshot has no filter for, and pairs never registered.
    assert_eq!(file.find(&CardKey::new("650102199001011234", "S990000000001")), None);
    let strangers = population(20_000, 4);
    let covered = strangers.iter().filter(|(id, serial, _)| file.find(&CardKey::new(id, serial)).is_some()).count();
    assert!(covered <= 2, "{covered} of 20,000 never-registered pairs covered at 20 bits");
    // One changed byte anywhere in the filters is refused.
    let mut tampered = signed.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    assert!(StatusFile::verify(&tampered, &directory(at(0), None)).is_err());
}

fn receipt_of(id: &str, serial: &str, sequence: u64, valid_until: Option<chrono::NaiveDate>) -> CardReceipt {
    CardReceipt {
        registry_id: REGISTRY.into(),
        key_id: "k1".into(),
        card: *CardKey::new(id, serial).digest(),
        sequence,
        signed_at: at(8),
        valid_until,
    }
}

fn far_day() -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::from_ymd_opt(2130, 6, 30)
}

#[test]
fn c4_a_status_only_snapshot_answers_cards_by_their_receipts_exactly_and_pairs_without_one_never() {
    let dir = directory(at(0), None);
    let people = population(20_000, 6);
    let mut builder = FilterBuilder::new(24);
    builder.add_province(&filter_cards(&people)).unwrap();
    let file = snapshot(builder.finish(), 50, at(9));
    let full = file.sign(&signing_key(7));
    let status_only = file.sign_status_only(&signing_key(7));
    let view = StatusView::new(StatusFile::verify(&status_only, &dir).unwrap()).unwrap();
    assert_eq!(view.snapshot().filter.coverage_bits(), 0);
    for (i, (id, serial, valid)) in people.iter().enumerate() {
        let key = CardKey::new(id, serial);
        let expected = if *valid { Lookup::Valid } else { Lookup::NotValid };
        let receipt = receipt_of(id, serial, 40 + (i as u64 % 11), far_day());
        assert_eq!(view.lookup_with_receipt(&key, &receipt), expected, "{serial}");
        assert_eq!(view.lookup(&key), Lookup::NotCovered, "no coverage: never without a receipt");
    }
    // Never registered: no receipt (above), or another card's receipt.
    for (i, (id, serial, _)) in population(20_000, 7).iter().enumerate() {
        let other = &people[i % people.len()];
        let lent = receipt_of(&other.0, &other.1, 40, far_day());
        assert_eq!(view.lookup_with_receipt(&CardKey::new(id, serial), &lent), Lookup::NotCovered);
        let serial_lent = CardKey::new(id, &other.1);
        assert_eq!(view.lookup_with_receipt(&serial_lent, &lent), Lookup::NotCovered, "another holder's serial");
    }
    let (id, serial, _) = &people[0];
    let key = CardKey::new(id, serial);
    // Registered after the snapshot, or expiring while it is used: left out of it, asked online.
    assert_eq!(view.lookup_with_receipt(&key, &receipt_of(id, serial, 51, far_day())), Lookup::NotCovered);
    let expiring = chrono::NaiveDate::from_ymd_opt(2118, 3, 5);
    assert_eq!(view.lookup_with_receipt(&key, &receipt_of(id, serial, 50, expiring)), Lookup::NotCovered);
    let mut elsewhere = receipt_of(id, serial, 50, None);
    elsewhere.registry_id = "registry-elsewhere".into();
    assert_eq!(view.lookup_with_receipt(&key, &elsewhere), Lookup::NotCovered);
    assert!(full.len() > 60_000, "the coverage (24 bits a card) is what the receipt saves: {}", full.len());
    assert!(status_only.len() < 2_000, "{}", status_only.len());
}

#[test]
fn c4_a_status_only_snapshot_is_within_2_bytes_per_card_not_valid_and_0_02_per_valid_card() {
    let people = population(200_000, 9);
    // Coverage is left out of the encoding: one column keeps the build short.
    let mut builder = FilterBuilder::new(1);
    builder.add_province(&filter_cards(&people)).unwrap();
    let status_only = snapshot(builder.finish(), 1, at(9)).sign_status_only(&signing_key(7));
    let not_valid = people.iter().filter(|p| !p.2).count();
    let budget = 0.02 * (people.len() - not_valid) as f64 + 2.0 * not_valid as f64;
    assert!((status_only.len() as f64) <= budget, "{} bytes, budget {budget:.0}", status_only.len());
}

#[test]
fn c4_a_receipt_round_trips_and_one_changed_byte_a_retired_or_an_unknown_key_is_refused() {
    let receipt = receipt_of("110102199001010011", "A1", 7, far_day());
    let bytes = receipt.sign(&signing_key(7));
    let dir = directory(at(0), None);
    assert_eq!(CardReceipt::verify(&bytes, &dir), Ok(receipt.clone()));
    for position in 0..bytes.len() {
        let mut altered = bytes.clone();
        altered[position] ^= 0x01;
        assert!(CardReceipt::verify(&altered, &dir).is_err(), "byte {position} changed and accepted");
    }
    assert!(CardReceipt::verify(&bytes[..bytes.len() - 1], &dir).is_err());
    let retired = CardReceipt::verify(&bytes, &directory(at(0), Some(at(7)))).err();
    assert_eq!(retired, Some(VerifyError::KeyNotValid { key_id: "k1".into() }));
    let forged = receipt.sign(&signing_key(8));
    assert_eq!(CardReceipt::verify(&forged, &dir).err(), Some(VerifyError::BadSignature));
    let unlimited = receipt_of("110102199001010011", "A1", 7, None);
    assert_eq!(CardReceipt::verify(&unlimited.sign(&signing_key(7)), &dir), Ok(unlimited));
}

#[test]
fn c4_a_delta_overrides_the_status_only_snapshot_for_a_card_presented_with_its_receipt() {
    let dir = directory(at(0), None);
    let people = population(1_000, 8);
    let (id, serial, _) = people.iter().find(|p| p.2).unwrap().clone();
    let snap = snapshot(Filter::build(&filter_cards(&people), 16), 10, at(9)).sign_status_only(&signing_key(7));
    let mut view = StatusView::new(StatusFile::verify(&snap, &dir).unwrap()).unwrap();
    let key = CardKey::new(&id, &serial);
    let receipt = receipt_of(&id, &serial, 3, far_day());
    assert_eq!(view.lookup_with_receipt(&key, &receipt), Lookup::Valid);
    view.apply(delta(10, 12, at(10), &[(id.clone(), serial.clone(), false)], &[])).unwrap();
    assert_eq!(view.lookup_with_receipt(&key, &receipt), Lookup::NotValid);
    // A card registered after the snapshot is answered from the delta that holds it.
    let newer = ("330102200001010022".to_owned(), "N1".to_owned(), true);
    view.apply(delta(12, 13, at(11), std::slice::from_ref(&newer), &[])).unwrap();
    let newer_key = CardKey::new(&newer.0, &newer.1);
    assert_eq!(view.lookup_with_receipt(&newer_key, &receipt_of(&newer.0, &newer.1, 13, far_day())), Lookup::Valid);
}
