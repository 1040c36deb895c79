//! Masking of personal data for logs, audit records and operator screens.

/// Keeps the address code (first six characters) and the check character (the last); hides the
/// birth date and the sequence number between them: `330102***********X`. A string too short to
/// have both parts is hidden whole.
pub fn mask_id_number(id: &str) -> String {
    const KEPT_FRONT: usize = 6;
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= KEPT_FRONT + 1 {
        return "*".repeat(chars.len());
    }
    let hidden = chars.len() - KEPT_FRONT - 1;
    chars[..KEPT_FRONT].iter().chain(std::iter::repeat_n(&'*', hidden)).chain(&chars[chars.len() - 1..]).collect()
}

/// Keeps the first character of a name: `王**`.
pub fn mask_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => std::iter::once(first).chain(chars.map(|_| '*')).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c4_masked_numbers_hide_birth_date_and_sequence() {
        assert_eq!(mask_id_number("11010519491231002X"), "110105***********X");
        assert_eq!(mask_id_number("330102199003071235"), "330102***********5");
        assert_eq!(mask_id_number("1101051949"), "110105***9", "a malformed number keeps no more");
        assert_eq!(mask_id_number("1101051"), "*******");
        assert_eq!(mask_name("Wang Fang"), "W********");
    }
}
