//! Biometric matching. SIMULATED: templates are fixed-length feature vectors compared bit by bit
//! against a threshold. A real matcher (face embedding, minutiae) implements the same trait.

/// A score in [0, 1] and whether it clears the matcher's threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchOutcome {
    pub score: f32,
    pub matched: bool,
}

/// Compares a live capture with an enrolled template.
pub trait BiometricMatcher: Send + Sync + 'static {
    fn match_face(&self, live: &[u8], enrolled: &[u8]) -> MatchOutcome;
    fn match_fingerprint(&self, live: &[u8], enrolled: &[u8]) -> MatchOutcome;
}

/// Length in bytes of a simulated template (a 512-bit feature vector).
pub const TEMPLATE_LEN: usize = 64;

/// The simulated matcher: score = share of equal bits. Two captures of the same person differ by
/// sensor noise (a few bits); two different people agree on about half the bits, like random
/// vectors. Thresholds are set so noise passes and strangers fail.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedMatcher {
    pub face_threshold: f32,
    pub fingerprint_threshold: f32,
}

impl Default for SimulatedMatcher {
    fn default() -> Self {
        Self { face_threshold: 0.90, fingerprint_threshold: 0.95 }
    }
}

impl SimulatedMatcher {
    fn score(live: &[u8], enrolled: &[u8]) -> f32 {
        if live.len() != TEMPLATE_LEN || enrolled.len() != TEMPLATE_LEN {
            return 0.0;
        }
        let differing: u32 = live.iter().zip(enrolled).map(|(a, b)| (a ^ b).count_ones()).sum();
        1.0 - differing as f32 / (TEMPLATE_LEN * 8) as f32
    }
}

impl BiometricMatcher for SimulatedMatcher {
    fn match_face(&self, live: &[u8], enrolled: &[u8]) -> MatchOutcome {
        let score = Self::score(live, enrolled);
        MatchOutcome { score, matched: score >= self.face_threshold }
    }

    fn match_fingerprint(&self, live: &[u8], enrolled: &[u8]) -> MatchOutcome {
        let score = Self::score(live, enrolled);
        MatchOutcome { score, matched: score >= self.fingerprint_threshold }
    }
}

/// Simulates a fresh capture: flips `bits` bits of `template`, spread by `seed`.
pub fn with_sensor_noise(template: &[u8], bits: usize, seed: u64) -> Vec<u8> {
    let mut out = template.to_vec();
    let total_bits = out.len() * 8;
    if total_bits == 0 {
        return out;
    }
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for _ in 0..bits {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let bit = (state >> 33) as usize % total_bits;
        out[bit / 8] ^= 1 << (bit % 8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(seed: u8) -> Vec<u8> {
        (0..TEMPLATE_LEN as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 ^ seed.wrapping_mul(97)).collect()
    }

    #[test]
    fn s2_the_same_person_with_sensor_noise_matches() {
        let matcher = SimulatedMatcher::default();
        let enrolled = template(1);
        let live = with_sensor_noise(&enrolled, 12, 7);
        assert!(matcher.match_face(&live, &enrolled).matched);
        assert!(matcher.match_fingerprint(&live, &enrolled).matched);
    }

    #[test]
    fn s3_another_person_does_not_match() {
        let matcher = SimulatedMatcher::default();
        let enrolled = template(1);
        let stranger = with_sensor_noise(&enrolled, 200, 3);
        assert!(!matcher.match_face(&stranger, &enrolled).matched);
        assert!(!matcher.match_fingerprint(&stranger, &enrolled).matched);
        assert!(!matcher.match_face(&[], &enrolled).matched, "no capture never matches");
    }
}
