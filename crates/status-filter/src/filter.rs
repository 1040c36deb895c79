//! The filters: which cards a snapshot covers, and which of those are valid.
//!
//! Clubcard (Mozilla's, behind Firefox's CRLite) is exact for the elements of its universe and
//! answers arbitrarily for anything else. Here the universe is the registered cards, and a
//! relying party may ask about a pair that was never registered; clubcard alone would call most
//! of those "valid". So a filter is two clubcards over the same keys:
//!
//! * **coverage**: an approximate ribbon over every covered card (`coverage_bits` columns, no exact
//!   stage: its universe, every pair that could be asked, cannot be enumerated). A covered card
//!   always passes; a pair that is not covered passes with probability about 2^-coverage_bits.
//! * **status**: an exact clubcard over the covered cards whose included set is "not valid".
//!
//! A lookup that fails coverage is "not covered": the client asks online.
//!
//! A relying party that reads a card's registration receipt (`receipt`: the registry's signature
//! that the card was registered by a sequence) knows the card is in a snapshot of that sequence or
//! later, as Firefox knows from a certificate's CT timestamps. It needs no coverage: the snapshot
//! without it ([`Filter::encode_status_only`], `coverage_bits` 0) is the status filter alone, about
//! a byte per card that is not valid and next to nothing per valid card.
//!
//! A snapshot is a pair per province ([`FilterBuilder`]), built one province after another, so
//! that the builder never holds the nation's cards and equations at once. A delta is one pair
//! in one block ([`Filter::build_one_block`]): its few cards spread over some 34 provinces, and
//! each block costs its own index entry and padding (1,000 changes over 34 provinces: 7.5 kB in
//! blocks, 3.9 kB in one).
use std::collections::BTreeMap;

use clubcard::{
    AsQuery, Clubcard, ClubcardIndexEntry, Equation, Filterable, Queryable,
    builder::{ApproximateRibbon, ClubcardBuilder, ExactRibbon},
};

use crate::{
    FormatError,
    key::CardKey,
    wire::{Reader, put, put_varint},
};

/// 256-bit equations: clubcard's own choice for CRLite.
const W: usize = 4;
/// Most coverage columns: each costs about one bit per covered card.
pub const MAX_COVERAGE_BITS: u8 = 32;
/// Tweaks so that the two filters hash a key independently.
const COVERAGE_TWEAK: u64 = 0x636f_7665_7261_6765;
const STATUS_TWEAK: u64 = 0x7374_6174_7573_3031;

type Club = Clubcard<W, (), ()>;

/// What a filter (or a snapshot with its deltas) says about a card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Valid,
    /// Reported lost, revoked, expired, awaiting collection or voided.
    NotValid,
    /// Not in the filter's universe (never registered, registered after the snapshot, or about
    /// to expire): ask the registry.
    NotCovered,
}

/// One card as the builder takes it.
#[derive(Debug, Clone, Copy)]
pub struct FilterCard {
    pub key: CardKey,
    pub valid: bool,
}

/// The block id of a one-block filter (no province code is `**`).
const ONE_BLOCK: [u8; 2] = *b"**";

/// How a filter's cards are split into clubcard blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocks {
    /// One block per province (snapshots: a province can be built and served on its own).
    ByProvince,
    /// One block for every card (deltas).
    One,
}

impl Blocks {
    fn of(self, key: &CardKey) -> [u8; 2] {
        match self {
            Self::ByProvince => key.block_id(),
            Self::One => ONE_BLOCK,
        }
    }
}

/// A key as clubcard hashes it, for one of the two filters.
struct Item {
    key: CardKey,
    block: [u8; 2],
    tweak: u64,
    not_valid: bool,
}

/// splitmix64's finaliser: spreads each digest word under a tweak.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl AsQuery<W> for Item {
    fn as_query(&self, m: usize) -> Equation<W> {
        let words = self.key.words();
        let mut a = [0u64; W];
        for (i, (a_i, word)) in a.iter_mut().zip(words).enumerate() {
            *a_i = mix(word ^ self.tweak.rotate_left(16 * i as u32));
        }
        a[0] |= 1;
        let start = mix(words[0] ^ words[3] ^ !self.tweak) % (m.max(1) as u64);
        Equation::homogeneous(start as usize, a)
    }

    fn block(&self) -> &[u8] {
        &self.block
    }

    fn discriminant(&self) -> &[u8] {
        self.key.digest()
    }
}

impl Filterable<W> for Item {
    fn included(&self) -> bool {
        self.not_valid
    }
}

impl Queryable<W> for Item {
    type UniverseMetadata = ();
    type PartitionMetadata = ();

    fn in_universe(&self, _: &()) -> bool {
        true
    }
}

/// See the module documentation.
pub struct Filter {
    coverage_bits: u8,
    parts: Parts,
    covered: u64,
    not_valid: u64,
}

/// The clubcards of a filter.
enum Parts {
    /// Nothing covered.
    Empty,
    /// One pair (coverage, status) whose blocks are provinces, or one block.
    Joint { blocks: Blocks, coverage: Option<Club>, status: Club },
    /// A pair per province, sorted by province ([`FilterBuilder`]): built one province at a
    /// time, so a nation's snapshot never holds every card's equations at once.
    PerProvince(Vec<Province>),
}

/// One province's coverage (none in a status-only filter) and status.
type Province = ([u8; 2], Option<Club>, Club);

/// Builds a filter one province at a time ([`Parts::PerProvince`]): the memory a build needs is
/// one province's cards and equations, plus the filters already built.
pub struct FilterBuilder {
    coverage_bits: u8,
    provinces: Vec<Province>,
    covered: u64,
    not_valid: u64,
}

/// A province given to [`FilterBuilder::add_province`] twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("province block {0:?} was already built")]
pub struct ProvinceAgain(pub String);

impl FilterBuilder {
    pub fn new(coverage_bits: u8) -> Self {
        let coverage_bits = coverage_bits.clamp(1, MAX_COVERAGE_BITS);
        Self { coverage_bits, provinces: Vec::new(), covered: 0, not_valid: 0 }
    }

    /// Builds the filters of the provinces `cards` hold (keys distinct); each province once.
    pub fn add_province(&mut self, cards: &[FilterCard]) -> Result<(), ProvinceAgain> {
        let Some(first) = cards.first() else { return Ok(()) };
        let block = first.key.block_id();
        if cards.iter().any(|card| card.key.block_id() != block) {
            // Several provinces: each on its own (the registry gives one at a time, uncopied).
            let provinces = grouped(cards, Blocks::ByProvince);
            return provinces.values().try_for_each(|province| self.add_province(province));
        }
        if self.provinces.iter().any(|(built, _, _)| *built == block) {
            return Err(ProvinceAgain(String::from_utf8_lossy(&block).into_owned()));
        }
        self.covered += cards.len() as u64;
        self.not_valid += cards.iter().filter(|c| !c.valid).count() as u64;
        let one = [(block, cards)];
        let coverage = build_coverage(&one, self.coverage_bits);
        let status = build_status(&one);
        self.provinces.push((block, Some(coverage), status));
        Ok(())
    }

    pub fn finish(mut self) -> Filter {
        if self.provinces.is_empty() {
            return Filter { coverage_bits: self.coverage_bits, parts: Parts::Empty, covered: 0, not_valid: 0 };
        }
        self.provinces.sort_unstable_by_key(|(block, _, _)| *block);
        Filter {
            coverage_bits: self.coverage_bits,
            parts: Parts::PerProvince(self.provinces),
            covered: self.covered,
            not_valid: self.not_valid,
        }
    }
}

/// `cards` by the block each is in.
fn grouped(cards: &[FilterCard], blocks: Blocks) -> BTreeMap<[u8; 2], Vec<FilterCard>> {
    let mut grouped: BTreeMap<[u8; 2], Vec<FilterCard>> = BTreeMap::new();
    for card in cards {
        grouped.entry(blocks.of(&card.key)).or_default().push(*card);
    }
    grouped
}

/// Coverage, then status, of one clubcard pair; `registered`: the caller knows the card is in the
/// filter's universe (a receipt), so coverage is not asked.
fn lookup_in(coverage: Option<&Club>, status: &Club, key: &CardKey, block: [u8; 2], registered: bool) -> Lookup {
    if !registered {
        let item = Item { key: *key, block, tweak: COVERAGE_TWEAK, not_valid: false };
        if !coverage.is_some_and(|coverage| coverage.unchecked_contains(&item)) {
            return Lookup::NotCovered;
        }
    }
    if status.unchecked_contains(&Item { key: *key, block, tweak: STATUS_TWEAK, not_valid: false }) {
        Lookup::NotValid
    } else {
        Lookup::Valid
    }
}

impl Filter {
    /// A filter covering `cards` (keys distinct), with `coverage_bits` (1..=32) columns of
    /// coverage: one clubcard pair with a block per province.
    pub fn build(cards: &[FilterCard], coverage_bits: u8) -> Self {
        Self::build_in(Blocks::ByProvince, cards, coverage_bits)
    }

    /// The same in one block (deltas: see the module documentation).
    pub fn build_one_block(cards: &[FilterCard], coverage_bits: u8) -> Self {
        Self::build_in(Blocks::One, cards, coverage_bits)
    }

    fn build_in(kind: Blocks, cards: &[FilterCard], coverage_bits: u8) -> Self {
        let coverage_bits = coverage_bits.clamp(1, MAX_COVERAGE_BITS);
        let not_valid = cards.iter().filter(|c| !c.valid).count() as u64;
        let blocks = grouped(cards, kind);
        if blocks.is_empty() {
            return Self { coverage_bits, parts: Parts::Empty, covered: 0, not_valid: 0 };
        }
        let blocks: Vec<([u8; 2], &[FilterCard])> =
            blocks.iter().map(|(block, cards)| (*block, cards.as_slice())).collect();
        let coverage = build_coverage(&blocks, coverage_bits);
        let status = build_status(&blocks);
        let parts = Parts::Joint { blocks: kind, coverage: Some(coverage), status };
        Self { coverage_bits, parts, covered: cards.len() as u64, not_valid }
    }

    /// See [`Lookup`]. Exact for covered cards; a status-only filter covers none.
    pub fn lookup(&self, key: &CardKey) -> Lookup {
        self.lookup_as(key, false)
    }

    /// The status of a card the caller knows to be in the filter's universe (its receipt says it
    /// was registered by the filter's sequence): exact. For any other card the answer is
    /// arbitrary, which is why only a verified receipt may lead here.
    pub fn lookup_registered(&self, key: &CardKey) -> Lookup {
        self.lookup_as(key, true)
    }

    fn lookup_as(&self, key: &CardKey, registered: bool) -> Lookup {
        match &self.parts {
            Parts::Empty => Lookup::NotCovered,
            Parts::Joint { blocks, coverage, status } => {
                lookup_in(coverage.as_ref(), status, key, blocks.of(key), registered)
            }
            Parts::PerProvince(provinces) => {
                let block = key.block_id();
                match provinces.binary_search_by_key(&block, |(province, _, _)| *province) {
                    Ok(at) => lookup_in(provinces[at].1.as_ref(), &provinces[at].2, key, block, registered),
                    Err(_) => Lookup::NotCovered,
                }
            }
        }
    }

    /// Columns of coverage; 0 for a status-only filter.
    pub fn coverage_bits(&self) -> u8 {
        self.coverage_bits
    }

    /// Cards covered, and of those not valid (0 and 0 for an empty filter).
    pub fn counts(&self) -> (u64, u64) {
        (self.covered, self.not_valid)
    }

    /// Bytes of each part when encoded: (coverage, status).
    pub fn encoded_sizes(&self) -> (usize, usize) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        match &self.parts {
            Parts::Empty => {}
            Parts::Joint { blocks, coverage, status } => {
                let sizes = Sizes::of(*blocks);
                coverage.iter().for_each(|coverage| encode_club(coverage, &mut a, sizes));
                encode_club(status, &mut b, sizes);
            }
            Parts::PerProvince(provinces) => {
                for (_, coverage, status) in provinces {
                    coverage.iter().for_each(|coverage| encode_club(coverage, &mut a, Sizes::Fixed));
                    encode_club(status, &mut b, Sizes::Fixed);
                }
            }
        }
        (a.len(), b.len())
    }

    /// The canonical encoding (signed as part of a snapshot or delta).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_parts(out, true);
    }

    /// The encoding without coverage (`coverage_bits` 0): the status filter alone, for relying
    /// parties that check cards by their receipts.
    pub fn encode_status_only(&self, out: &mut Vec<u8>) {
        self.encode_parts(out, false);
    }

    fn encode_parts(&self, out: &mut Vec<u8>, with_coverage: bool) {
        let club = |coverage: &Option<Club>, out: &mut Vec<u8>, sizes| {
            if let (true, Some(coverage)) = (with_coverage, coverage) {
                encode_club(coverage, out, sizes);
            }
        };
        out.push(if with_coverage { self.coverage_bits } else { 0 });
        let presence = match &self.parts {
            Parts::Empty => 0,
            Parts::Joint { blocks: Blocks::ByProvince, .. } => 1,
            // 2 was one block with fixed-width sizes (still read).
            Parts::Joint { blocks: Blocks::One, .. } => 4,
            Parts::PerProvince(_) => 3,
        };
        out.push(presence);
        if presence == 0 {
            return;
        }
        let sizes = match &self.parts {
            Parts::Joint { blocks, .. } => Sizes::of(*blocks),
            _ => Sizes::Fixed,
        };
        sizes.put_u64(out, self.covered);
        sizes.put_u64(out, self.not_valid);
        match &self.parts {
            Parts::Empty => {}
            Parts::Joint { coverage, status, .. } => {
                club(coverage, out, sizes);
                encode_club(status, out, sizes);
            }
            Parts::PerProvince(provinces) => {
                out.extend_from_slice(&(provinces.len() as u32).to_be_bytes());
                for (block, coverage, status) in provinces {
                    out.extend_from_slice(block);
                    club(coverage, out, sizes);
                    encode_club(status, out, sizes);
                }
            }
        }
    }

    /// A one-block filter as registries before presence 4 encoded it (presence 2, fixed-width
    /// sizes): such deltas are still read.
    #[cfg(test)]
    pub(crate) fn encode_as_presence_2(&self, out: &mut Vec<u8>) {
        let Parts::Joint { blocks: Blocks::One, coverage: Some(coverage), status } = &self.parts else {
            panic!("not a one-block filter with coverage");
        };
        out.extend_from_slice(&[self.coverage_bits, 2]);
        out.extend_from_slice(&self.covered.to_be_bytes());
        out.extend_from_slice(&self.not_valid.to_be_bytes());
        encode_club(coverage, out, Sizes::Fixed);
        encode_club(status, out, Sizes::Fixed);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, FormatError> {
        let coverage_bits = reader.u8()?;
        if coverage_bits > MAX_COVERAGE_BITS {
            return Err(FormatError::Invalid("coverage bits"));
        }
        // Status only (0): no coverage club precedes a status club.
        let coverage = |reader: &mut Reader<'_>, sizes| -> Result<Option<Club>, FormatError> {
            if coverage_bits == 0 { Ok(None) } else { decode_club(reader, sizes).map(Some) }
        };
        let presence = reader.u8()?;
        if presence == 0 {
            return Ok(Self { coverage_bits, parts: Parts::Empty, covered: 0, not_valid: 0 });
        }
        let sizes = if presence == 4 { Sizes::Varint } else { Sizes::Fixed };
        let covered = sizes.u64(reader)?;
        let not_valid = sizes.u64(reader)?;
        let parts = match presence {
            1 | 2 | 4 => {
                let blocks = if presence == 1 { Blocks::ByProvince } else { Blocks::One };
                Parts::Joint { blocks, coverage: coverage(reader, sizes)?, status: decode_club(reader, sizes)? }
            }
            3 => {
                let count = reader.u32()?;
                let mut provinces: Vec<Province> = Vec::new();
                for _ in 0..count {
                    let block: [u8; 2] =
                        reader.take(2)?.try_into().map_err(|_| FormatError::Invalid("province block"))?;
                    if provinces.last().is_some_and(|(before, _, _)| *before >= block) {
                        return Err(FormatError::Invalid("province blocks out of order"));
                    }
                    provinces.push((block, coverage(reader, sizes)?, decode_club(reader, sizes)?));
                }
                Parts::PerProvince(provinces)
            }
            _ => return Err(FormatError::Invalid("filter presence")),
        };
        Ok(Self { coverage_bits, parts, covered, not_valid })
    }
}

fn build_coverage(blocks: &[([u8; 2], &[FilterCard])], bits: u8) -> Club {
    let mut builder = ClubcardBuilder::<W, Item>::new();
    let mut ribbons = Vec::with_capacity(blocks.len());
    for (block, cards) in blocks {
        let mut ribbon = builder.new_approx_builder(block);
        for card in cards.iter() {
            ribbon.insert(Item { key: card.key, block: *block, tweak: COVERAGE_TWEAK, not_valid: true });
        }
        // A universe 2^bits times the covered set: clubcard then solves `bits` columns, so a key
        // that is not covered passes with probability about 2^-bits.
        ribbon.set_universe_size(cards.len().saturating_mul((1usize << bits) + 1));
        ribbons.push(ApproximateRibbon::from(ribbon));
    }
    builder.collect_approx_ribbons(ribbons);
    // No exact stage: each block's exact ribbon is empty, so a key passing the approximate one
    // is "covered".
    let exact = blocks.iter().map(|(block, _)| ExactRibbon::from(builder.new_exact_builder(block))).collect();
    builder.collect_exact_ribbons(exact);
    builder.build::<Item>((), ())
}

fn build_status(blocks: &[([u8; 2], &[FilterCard])]) -> Club {
    let item = |block: &[u8; 2], card: &FilterCard| Item {
        key: card.key,
        block: *block,
        tweak: STATUS_TWEAK,
        not_valid: !card.valid,
    };
    let mut builder = ClubcardBuilder::<W, Item>::new();
    let mut ribbons = Vec::with_capacity(blocks.len());
    for (block, cards) in blocks {
        let not_valid = cards.iter().filter(|c| !c.valid).count();
        // A ribbon costs in proportion to the set it encodes: encode the smaller side.
        let inverted = 2 * not_valid > cards.len();
        let mut ribbon = builder.new_approx_builder(block);
        ribbon.set_universe_size(cards.len());
        ribbon.set_inverted(inverted);
        for card in cards.iter().filter(|c| c.valid == inverted) {
            ribbon.insert(item(block, card));
        }
        ribbons.push(ApproximateRibbon::from(ribbon));
    }
    builder.collect_approx_ribbons(ribbons);
    let mut exact = Vec::with_capacity(blocks.len());
    for (block, cards) in blocks {
        let mut ribbon = builder.new_exact_builder(block);
        for card in cards.iter() {
            ribbon.insert(item(block, card));
        }
        exact.push(ExactRibbon::from(ribbon));
    }
    builder.collect_exact_ribbons(exact);
    builder.build::<Item>((), ())
}

/// How a clubcard's counts, sizes and lengths are written. A delta's 1,000 cards make about 50
/// of them, and each fixed-width one is 4 or 8 bytes where a varint is 1 or 2 (about 250 bytes
/// a delta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sizes {
    /// Counts and lengths u32, sizes u64, big-endian (snapshots).
    Fixed,
    /// Every count, size and length a LEB128 varint (deltas, presence 4).
    Varint,
}

impl Sizes {
    fn of(blocks: Blocks) -> Self {
        match blocks {
            Blocks::ByProvince => Self::Fixed,
            Blocks::One => Self::Varint,
        }
    }

    fn put_u32(self, out: &mut Vec<u8>, value: usize) {
        match self {
            Self::Fixed => out.extend_from_slice(&(value as u32).to_be_bytes()),
            Self::Varint => put_varint(out, value as u64),
        }
    }

    fn put_u64(self, out: &mut Vec<u8>, value: u64) {
        match self {
            Self::Fixed => out.extend_from_slice(&value.to_be_bytes()),
            Self::Varint => put_varint(out, value),
        }
    }

    fn put_field(self, out: &mut Vec<u8>, field: &[u8]) {
        match self {
            Self::Fixed => put(out, field),
            Self::Varint => {
                put_varint(out, field.len() as u64);
                out.extend_from_slice(field);
            }
        }
    }

    fn put_words(self, out: &mut Vec<u8>, words: &[u64]) {
        self.put_u64(out, words.len() as u64);
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }

    fn u32(self, reader: &mut Reader<'_>) -> Result<usize, FormatError> {
        match self {
            Self::Fixed => Ok(reader.u32()? as usize),
            Self::Varint => self.usize(reader),
        }
    }

    fn u64(self, reader: &mut Reader<'_>) -> Result<u64, FormatError> {
        match self {
            Self::Fixed => reader.u64(),
            Self::Varint => reader.varint(),
        }
    }

    fn usize(self, reader: &mut Reader<'_>) -> Result<usize, FormatError> {
        usize::try_from(self.u64(reader)?).map_err(|_| FormatError::Invalid("a size beyond this machine"))
    }

    fn field<'a>(self, reader: &mut Reader<'a>) -> Result<&'a [u8], FormatError> {
        match self {
            Self::Fixed => reader.field(),
            Self::Varint => {
                let len = self.usize(reader)?;
                reader.take(len)
            }
        }
    }

    fn words(self, reader: &mut Reader<'_>) -> Result<Vec<u64>, FormatError> {
        let len = self.usize(reader)?;
        let bytes = reader.take(len.checked_mul(8).ok_or(FormatError::Truncated)?)?;
        Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
    }
}

fn encode_club(club: &Club, out: &mut Vec<u8>, sizes: Sizes) {
    sizes.put_u32(out, club.index.len());
    for (block, entry) in &club.index {
        sizes.put_field(out, block);
        for value in [
            entry.approx_filter_m,
            entry.exact_filter_m,
            entry.approx_filter_rank,
            entry.approx_filter_offset,
            entry.exact_filter_offset,
        ] {
            sizes.put_u64(out, value as u64);
        }
        out.push(u8::from(entry.inverted));
        sizes.put_u32(out, entry.exceptions.len());
        for exception in &entry.exceptions {
            sizes.put_field(out, exception);
        }
    }
    sizes.put_u32(out, club.approx_filter.len());
    for column in &club.approx_filter {
        sizes.put_words(out, column);
    }
    sizes.put_words(out, &club.exact_filter);
}

fn decode_club(reader: &mut Reader<'_>, sizes: Sizes) -> Result<Club, FormatError> {
    let blocks = sizes.u32(reader)?;
    let mut index = BTreeMap::new();
    for _ in 0..blocks {
        let block = sizes.field(reader)?.to_vec();
        let mut values = [0usize; 5];
        for value in &mut values {
            *value = sizes.usize(reader)?;
        }
        let inverted = match reader.u8()? {
            0 => false,
            1 => true,
            _ => return Err(FormatError::Invalid("inverted flag")),
        };
        let count = sizes.u32(reader)?;
        let mut exceptions = Vec::new();
        for _ in 0..count {
            exceptions.push(sizes.field(reader)?.to_vec());
        }
        let [approx_filter_m, exact_filter_m, approx_filter_rank, approx_filter_offset, exact_filter_offset] = values;
        let entry = ClubcardIndexEntry {
            approx_filter_m,
            exact_filter_m,
            approx_filter_rank,
            approx_filter_offset,
            exact_filter_offset,
            inverted,
            exceptions,
        };
        if index.insert(block, entry).is_some() {
            return Err(FormatError::Invalid("a block twice"));
        }
    }
    let columns = sizes.u32(reader)?;
    let mut approx_filter = Vec::new();
    for _ in 0..columns {
        approx_filter.push(sizes.words(reader)?);
    }
    let exact_filter = sizes.words(reader)?;
    // clubcard indexes the columns by rank: a rank beyond them would panic at lookup.
    if index.values().any(|entry| entry.approx_filter_rank > approx_filter.len()) {
        return Err(FormatError::Invalid("a block's rank exceeds the columns"));
    }
    Ok(Clubcard { universe: (), partition: (), index, approx_filter, exact_filter })
}
