//! Local check latency and build time of a status filter (issue 16), without signing:
//! `cargo run --release -p yidi-status-filter --example lookup_latency -- 1000000 24`.
use std::time::Instant;

use yidi_status_filter::{CardKey, Filter, FilterCard};

fn main() {
    let mut args = std::env::args().skip(1);
    let cards: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let bits: u8 = args.next().and_then(|a| a.parse().ok()).unwrap_or(24);
    let key = |i: u64| CardKey::new(&format!("{:02}0102{:012}", 11 + i % 60, i), &format!("P{i:011}"));
    let input: Vec<FilterCard> = (0..cards).map(|i| FilterCard { key: key(i), valid: i % 100 != 7 }).collect();
    let started = Instant::now();
    let filter = Filter::build(&input, bits);
    println!("{cards} cards, {bits} coverage bits: built in {:.2} s", started.elapsed().as_secs_f64());
    let mut samples: Vec<u128> = (0..cards)
        .step_by((cards / 200_000).max(1) as usize)
        .map(|i| {
            let started = Instant::now();
            std::hint::black_box(filter.lookup(&key(i)));
            started.elapsed().as_nanos()
        })
        .collect();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!("lookup incl. key hashing (and formatting the two strings): p50 {} ns, p99 {} ns", at(0.5), at(0.99));
}
