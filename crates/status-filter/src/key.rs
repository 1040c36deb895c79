//! The key a card has in a filter: a digest of (identity number, serial), so that a snapshot
//! reveals neither, and the province block the number belongs to.
use sha2::{Digest, Sha256};

/// Domain separation: a card key is never another hash of the suite.
const CARD_KEY_TAG: &[u8] = b"yidi.status-filter.card.v1";
/// The block of numbers that do not start with a province code (never issued so, but accepted).
pub const NO_PROVINCE_BLOCK: [u8; 2] = *b"--";

/// See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardKey {
    digest: [u8; 32],
    block: [u8; 2],
}

impl CardKey {
    /// The key of a card: the number as the registry stores it (trimmed, upper case) and the serial.
    pub fn new(id_number: &str, card_serial: &str) -> Self {
        let id_number = id_number.trim().to_ascii_uppercase();
        let mut hasher = Sha256::new();
        hasher.update(CARD_KEY_TAG);
        // Length-prefixed: no two (number, serial) pairs hash the same bytes.
        hasher.update((id_number.len() as u32).to_be_bytes());
        hasher.update(id_number.as_bytes());
        hasher.update((card_serial.len() as u32).to_be_bytes());
        hasher.update(card_serial.as_bytes());
        let block = match id_number.as_bytes() {
            [a, b, ..] if a.is_ascii_digit() && b.is_ascii_digit() => [*a, *b],
            _ => NO_PROVINCE_BLOCK,
        };
        Self { digest: hasher.finalize().into(), block }
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The province code (two ASCII digits), the filter block the card is in.
    pub fn block(&self) -> &[u8] {
        &self.block
    }

    pub(crate) fn block_id(&self) -> [u8; 2] {
        self.block
    }

    pub(crate) fn words(&self) -> [u64; 4] {
        let mut words = [0u64; 4];
        for (word, chunk) in words.iter_mut().zip(self.digest.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
        words
    }
}
