//! `yidi-bench snapshot`: issue 16's figures, in process (no registry: the filter, signing and the
//! local lookup are what is measured). Sizes at each card count with 1% not valid, a delta of
//! 1,000 changes, build time, local check latency; and the same for the snapshot without coverage
//! that relying parties checking cards by their receipts keep.
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use yidi_domain::{Bureau, BureauKey, Directory, IdNumber, Role};
use yidi_status_filter::{
    CardKey, CardReceipt, Filter, FilterBuilder, FilterCard, Header, Kind, Lookup, StatusFile, StatusView,
};

fn pair(i: u64) -> (String, String) {
    let birth = chrono::NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default()
        + chrono::Duration::days((i / 1000 % 25_000) as i64);
    let province = ["11", "33", "36", "44", "51", "13", "14", "15"][(i % 8) as usize];
    let id = IdNumber::compose(&format!("{province}{:04}", i / 25_000_000 % 10_000), birth, (i % 1000) as u16);
    (id.as_str().to_owned(), format!("P{i:011}"))
}

fn signed(kind: Kind, filter: Filter, key: &SigningKey) -> Vec<u8> {
    signed_both(kind, filter, key).0
}

/// The signed file, and the same without coverage.
fn signed_both(kind: Kind, filter: Filter, key: &SigningKey) -> (Vec<u8>, Vec<u8>) {
    let now = Utc::now();
    let header = Header {
        kind,
        registry_id: "registry".into(),
        key_id: "k1".into(),
        from_sequence: 0,
        sequence: 0,
        built_at: now,
        usable_until: now + chrono::Duration::days(7),
    };
    let file = StatusFile { header, filter, ask_online: Vec::new() };
    (file.sign(key), file.sign_status_only(key))
}

fn receipt_of(id: &str, serial: &str) -> CardReceipt {
    CardReceipt {
        registry_id: "registry".into(),
        key_id: "k1".into(),
        card: *CardKey::new(id, serial).digest(),
        sequence: 0,
        signed_at: Utc::now(),
        valid_until: chrono::NaiveDate::from_ymd_opt(2140, 1, 1),
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut counts = vec![1_000_000u64, 10_000_000];
    let mut bits = 24u8;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cards" => counts = value.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?,
            "--coverage-bits" => bits = value.parse()?,
            other => anyhow::bail!("unknown option {other} (snapshot: --cards N,M --coverage-bits B)"),
        }
    }
    let key = SigningKey::from_bytes(&[9; 32]);
    let directory_key = BureauKey {
        id: "k1".into(),
        public_key: key.verifying_key(),
        valid_from: Utc::now() - chrono::Duration::days(1),
        valid_until: None,
    };
    let directory = Directory::new(vec![Bureau::new("registry", Role::Registry).with_keys(vec![directory_key])])?;
    println!("coverage bits: {bits}");
    println!(
        "| cards | not valid | snapshot bytes | coverage bytes | status bytes | B/card | status B/not-valid card | without coverage (receipts): bytes | its share of the target (0.02 B/valid + 2 B/not valid) | key hashing s | build s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &count in &counts {
        let hashing = Instant::now();
        let cards: Vec<FilterCard> = (0..count)
            .map(|i| {
                let (id, serial) = pair(i);
                FilterCard { key: CardKey::new(&id, &serial), valid: i % 100 != 7 }
            })
            .collect();
        let hashing = hashing.elapsed().as_secs_f64();
        // As the registry builds it: one province at a time.
        let building = Instant::now();
        let mut by_province: std::collections::BTreeMap<Vec<u8>, Vec<FilterCard>> = Default::default();
        for card in &cards {
            by_province.entry(card.key.block().to_vec()).or_default().push(*card);
        }
        let mut builder = FilterBuilder::new(bits);
        for province in by_province.into_values() {
            builder.add_province(&province)?;
        }
        let filter = builder.finish();
        let build = building.elapsed().as_secs_f64();
        let (coverage, status) = filter.encoded_sizes();
        let not_valid = count / 100;
        let (bytes, status_only) = signed_both(Kind::Snapshot, filter, &key);
        let budget = 0.02 * (count - not_valid) as f64 + 2.0 * not_valid as f64;
        println!(
            "| {count} | {not_valid} | {} | {coverage} | {status} | {:.4} | {:.3} | {} | {:.2} | {hashing:.2} | {build:.2} |",
            bytes.len(),
            bytes.len() as f64 / count as f64,
            status as f64 / not_valid as f64,
            status_only.len(),
            status_only.len() as f64 / budget,
        );
        let view = StatusView::new(StatusFile::verify(&bytes, &directory)?)?;
        let by_receipt = StatusView::new(StatusFile::verify(&status_only, &directory)?)?;
        let mut latency = Histogram::<u64>::new(3)?;
        for i in (0..count).step_by((count / 200_000).max(1) as usize) {
            let (id, serial) = pair(i);
            let started = Instant::now();
            std::hint::black_box(view.lookup(&CardKey::new(&id, &serial)));
            latency.record(started.elapsed().as_nanos() as u64)?;
        }
        println!(
            "local check (key hashing + lookup) at {count}: p50 {} ns, p99 {} ns, {} samples",
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.len()
        );
        // By receipt: verified once when the card is read (as a TLS client verifies a chain),
        // then the lookup, which is what each check costs.
        let (mut verifying, mut checking) = (Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?);
        for i in (0..count).step_by((count / 20_000).max(1) as usize) {
            let (id, serial) = pair(i);
            let bytes = receipt_of(&id, &serial).sign(&key);
            let started = Instant::now();
            let receipt = CardReceipt::verify(&bytes, &directory)?;
            verifying.record(started.elapsed().as_nanos() as u64)?;
            let started = Instant::now();
            let answer = by_receipt.lookup_with_receipt(&CardKey::new(&id, &serial), &receipt);
            checking.record(started.elapsed().as_nanos() as u64)?;
            let expected = if i % 100 == 7 { Lookup::NotValid } else { Lookup::Valid };
            anyhow::ensure!(answer == expected, "card {i} by receipt: {answer:?}, expected {expected:?}");
        }
        println!(
            "by receipt at {count}: check (key hashing + lookup) p50 {} ns, p99 {} ns; receipt verification (once per card read) p50 {} ns, p99 {} ns; {} samples",
            checking.value_at_quantile(0.5),
            checking.value_at_quantile(0.99),
            verifying.value_at_quantile(0.5),
            verifying.value_at_quantile(0.99),
            checking.len()
        );
        drop(cards);
    }
    // A delta of 1,000 changes over every province, as a nation's minute is: half loss reports,
    // half new cards handed over. Deltas are one block; a block per province for comparison.
    const PROVINCES: [&str; 34] = [
        "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41", "42", "43",
        "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65", "71", "81", "82",
    ];
    let changes: Vec<FilterCard> = (0..1000u64)
        .map(|i| {
            let province = PROVINCES[(i % 34) as usize];
            let birth =
                chrono::NaiveDate::from_ymd_opt(1980, 1, 1).unwrap_or_default() + chrono::Duration::days(i as i64);
            let id = IdNumber::compose(&format!("{province}0102"), birth, (i % 1000) as u16);
            FilterCard { key: CardKey::new(id.as_str(), &format!("D{i:011}")), valid: i % 2 == 0 }
        })
        .collect();
    let one_block = Filter::build_one_block(&changes, bits);
    let (coverage, status) = one_block.encoded_sizes();
    let delta = signed(Kind::Delta, one_block, &key);
    let by_province = signed(Kind::Delta, Filter::build(&changes, bits), &key);
    println!(
        "delta of 1,000 changes over 34 provinces: {} bytes signed, {coverage} of coverage and {status} of status (a block per province: {} bytes)",
        delta.len(),
        by_province.len()
    );
    Ok(())
}
