//! The relying party's files: `snapshot.bin` (the signed snapshot as fetched), `deltas.bin` (the
//! signed deltas applied since, each prefixed by its length as u32 big-endian) and `hits.txt`
//! (checks answered "not valid" locally, not yet reported: number, serial and time per line).
//! Everything read is verified again: the files are a cache, not a trust anchor.
use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};

const SNAPSHOT: &str = "snapshot.bin";
const DELTAS: &str = "deltas.bin";
const HITS: &str = "hits.txt";

/// A stored snapshot (encoded) and the deltas appended after it, oldest first.
pub type Stored = (Vec<u8>, Vec<Vec<u8>>);

/// A check answered "not valid" locally, to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHit {
    pub id_number: String,
    pub card_serial: String,
    pub checked_at: DateTime<Utc>,
}

impl PendingHit {
    fn line(&self) -> String {
        format!("{}\t{}\t{}\n", self.id_number, self.card_serial, self.checked_at.to_rfc3339())
    }
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The folder is created if missing.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored snapshot and deltas, if any. A delta record cut short (a crash while appending)
    /// ends the list.
    pub fn read(&self) -> io::Result<Option<Stored>> {
        let snapshot = match fs::read(self.path(SNAPSHOT)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let records = match fs::read(self.path(DELTAS)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut deltas = Vec::new();
        let mut rest = records.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_be_bytes(*len) as usize;
            let Some((delta, tail)) = tail.split_at_checked(len) else { break };
            deltas.push(delta.to_vec());
            rest = tail;
        }
        Ok(Some((snapshot, deltas)))
    }

    /// Replaces the snapshot (atomically) and forgets the deltas of the old one.
    pub fn save_snapshot(&self, bytes: &[u8]) -> io::Result<()> {
        let temporary = self.path("snapshot.bin.new");
        fs::write(&temporary, bytes)?;
        match fs::remove_file(self.path(DELTAS)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::rename(temporary, self.path(SNAPSHOT))
    }

    pub fn append_delta(&self, bytes: &[u8]) -> io::Result<()> {
        let mut file = fs::OpenOptions::new().create(true).append(true).open(self.path(DELTAS))?;
        let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("delta over 4 GiB"))?;
        let mut record = len.to_be_bytes().to_vec();
        record.extend_from_slice(bytes);
        file.write_all(&record)
    }

    pub fn add_hit(&self, hit: &PendingHit) -> io::Result<()> {
        let mut file = fs::OpenOptions::new().create(true).append(true).open(self.path(HITS))?;
        file.write_all(hit.line().as_bytes())
    }

    pub fn hits(&self) -> io::Result<Vec<PendingHit>> {
        let text = match fs::read_to_string(self.path(HITS)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split('\t');
                let (id_number, card_serial, at) = (parts.next()?, parts.next()?, parts.next()?);
                Some(PendingHit {
                    id_number: id_number.to_owned(),
                    card_serial: card_serial.to_owned(),
                    checked_at: DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc),
                })
            })
            .collect())
    }

    /// Forgets the first `reported` pending hits (those sent).
    pub fn drop_hits(&self, reported: usize) -> io::Result<()> {
        let mut hits = self.hits()?;
        let rest = hits.split_off(reported.min(hits.len()));
        let temporary = self.path("hits.txt.new");
        fs::write(&temporary, rest.iter().map(PendingHit::line).collect::<String>())?;
        fs::rename(temporary, self.path(HITS))
    }
}
