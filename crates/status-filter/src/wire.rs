//! Reading the canonical encoding: every length checked against what is left, so that no input
//! makes the reader allocate more than it holds or panic.
use chrono::{DateTime, Utc};

use crate::FormatError;

/// Appends one length-prefixed field.
pub(crate) fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// A time as status statements encode it: seconds (i64) and nanoseconds (u32), big-endian.
pub(crate) fn put_time(out: &mut Vec<u8>, at: DateTime<Utc>) {
    out.extend_from_slice(&at.timestamp().to_be_bytes());
    out.extend_from_slice(&at.timestamp_subsec_nanos().to_be_bytes());
}

/// Appends `value` as LEB128: seven bits a byte, low first, the high bit set on all but the last.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.bytes.len() {
            return Err(FormatError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(FormatError::Invalid("varint beyond 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(FormatError::Invalid("varint beyond 64 bits"))
    }

    pub(crate) fn field(&mut self) -> Result<&'a [u8], FormatError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub(crate) fn text(&mut self) -> Result<String, FormatError> {
        String::from_utf8(self.field()?.to_vec()).map_err(|_| FormatError::Invalid("text"))
    }

    pub(crate) fn time(&mut self) -> Result<DateTime<Utc>, FormatError> {
        let seconds = i64::from_be_bytes(self.array()?);
        let nanos = self.u32()?;
        DateTime::from_timestamp(seconds, nanos).ok_or(FormatError::Invalid("time"))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}
