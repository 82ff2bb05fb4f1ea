//! Identities, their revocation times, and (optionally) a journal that keeps them across
//! restarts.
//!
//! `--state FILE` is an append-only JSON-lines journal: a header line (resource id and the
//! token-signing key, so tokens minted before a restart still verify) and then one full
//! snapshot of an identity per mutation; on load the last snapshot of each identity wins, and
//! the file is compacted to one line per identity. Appending a line per change keeps a write
//! at a few hundred bytes whatever the number of identities, and a line is written before the
//! change is answered, so an emulator killed at any moment has persisted everything it
//! acknowledged (the bytes are in the page cache; only a machine crash could lose them).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Everything the emulator knows about one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    pub created_at: Timestamp,
    /// Tokens issued before this instant are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token_issued_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<Timestamp>,
    /// Hashes of the tokens issued after `revoked_at` but within the same whole second.
    /// A token's `iat` has one-second resolution, so it cannot tell on its own whether it was
    /// minted just before or just after a revoke in the same second; an operator that revokes
    /// and immediately re-issues does exactly that. Bounded by one second of issues and
    /// cleared by the next revoke; not persisted (after a restart such tokens read as revoked).
    #[serde(skip)]
    same_second_tokens: Vec<[u8; 32]>,
}

impl IdentityRecord {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

/// Why an operation on an identity failed.
#[derive(Debug)]
pub enum StoreError {
    /// Never created here, or deleted.
    NotFound,
    /// The journal could not be written; the change was not made.
    Persist(std::io::Error),
}

/// What the validation endpoint concludes about a (correctly signed) token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TokenStatus {
    Valid,
    Expired,
    Revoked,
    Deleted,
    UnknownIdentity,
}

/// The first line of a state file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateHeader {
    pub resource_id: String,
    /// PKCS#8 DER of the token-signing key, base64.
    pub signing_key: String,
}

pub struct Store {
    identities: HashMap<String, IdentityRecord>,
    /// customId → id, for live identities only.
    by_custom_id: HashMap<String, String>,
    journal: Option<Journal>,
}

struct Journal {
    file: File,
}

impl Journal {
    fn append(&mut self, record: &IdentityRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        // One write call per line, so a killed process leaves whole lines (or a torn last
        // line, which loading skips).
        self.file.write_all(&line)
    }
}

/// What a state file held.
pub struct LoadedState {
    pub header: Option<StateHeader>,
    pub records: Vec<IdentityRecord>,
}

/// Reads a state file; a missing file is an empty state.
pub fn load_state(path: &Path) -> anyhow::Result<LoadedState> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LoadedState {
                header: None,
                records: Vec::new(),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = BufReader::new(file).lines();
    let header = match lines.next() {
        None => None,
        Some(line) => Some(
            serde_json::from_str::<StateHeader>(&line?)
                .with_context(|| format!("{} is not an acs-emulator state file", path.display()))?,
        ),
    };
    let mut latest: HashMap<String, IdentityRecord> = HashMap::new();
    let mut order = Vec::new();
    for (number, line) in lines.enumerate() {
        let line = line?;
        match serde_json::from_str::<IdentityRecord>(&line) {
            Ok(record) => {
                if !latest.contains_key(&record.id) {
                    order.push(record.id.clone());
                }
                latest.insert(record.id.clone(), record);
            }
            Err(e) => tracing::warn!(
                "skipping unreadable line {} of {}: {e}",
                number + 2,
                path.display()
            ),
        }
    }
    let records = order
        .into_iter()
        .filter_map(|id| latest.remove(&id))
        .collect();
    Ok(LoadedState { header, records })
}

impl Store {
    /// An in-memory store.
    pub fn in_memory() -> Self {
        Self {
            identities: HashMap::new(),
            by_custom_id: HashMap::new(),
            journal: None,
        }
    }

    /// A store backed by `path`: the file is rewritten compacted (header, then one line per
    /// identity) and then appended to.
    pub fn persistent(
        path: &Path,
        header: &StateHeader,
        records: Vec<IdentityRecord>,
    ) -> anyhow::Result<Self> {
        let mut tmp = PathBuf::from(path);
        tmp.as_mut_os_string().push(".tmp");
        {
            let mut out = std::io::BufWriter::new(create_private(&tmp)?);
            serde_json::to_writer(&mut out, header)?;
            out.write_all(b"\n")?;
            for record in &records {
                serde_json::to_writer(&mut out, record)?;
                out.write_all(b"\n")?;
            }
            out.into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut store = Self {
            journal: Some(Journal { file }),
            ..Self::in_memory()
        };
        for record in records {
            if let (Some(custom), false) = (&record.custom_id, record.is_deleted()) {
                store.by_custom_id.insert(custom.clone(), record.id.clone());
            }
            store.identities.insert(record.id.clone(), record);
        }
        Ok(store)
    }

    fn commit(&mut self, record: IdentityRecord) -> Result<IdentityRecord, StoreError> {
        if let Some(journal) = &mut self.journal {
            journal.append(&record).map_err(StoreError::Persist)?;
        }
        self.identities.insert(record.id.clone(), record.clone());
        Ok(record)
    }

    /// The live identity with this customId, if any.
    pub fn find_custom(&self, custom_id: &str) -> Option<&IdentityRecord> {
        self.by_custom_id
            .get(custom_id)
            .and_then(|id| self.identities.get(id))
    }

    /// Records a new identity.
    pub fn create(
        &mut self,
        id: String,
        custom_id: Option<String>,
        now: Timestamp,
    ) -> Result<IdentityRecord, StoreError> {
        let record = self.commit(IdentityRecord {
            id,
            custom_id,
            created_at: now,
            revoked_at: None,
            last_token_issued_at: None,
            deleted_at: None,
            same_second_tokens: Vec::new(),
        })?;
        if let Some(custom) = &record.custom_id {
            self.by_custom_id.insert(custom.clone(), record.id.clone());
        }
        Ok(record)
    }

    /// The identity if it exists and is not deleted.
    pub fn live(&self, id: &str) -> Result<&IdentityRecord, StoreError> {
        self.identities
            .get(id)
            .filter(|r| !r.is_deleted())
            .ok_or(StoreError::NotFound)
    }

    /// Notes that `token` was minted at `issued_at` (after the signature, outside the lock).
    pub fn record_issue(
        &mut self,
        id: &str,
        issued_at: Timestamp,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut record = self.live(id)?.clone();
        record.last_token_issued_at = Some(issued_at);
        if let Some(revoked) = record.revoked_at {
            // Same second as the revoke, and after it: only the hash can tell later.
            if issued_at >= revoked && issued_at.as_second() == revoked.as_second() {
                record.same_second_tokens.push(token_hash(token));
            }
        }
        self.commit(record).map(drop)
    }

    /// Revokes every token issued so far.
    pub fn revoke(&mut self, id: &str, now: Timestamp) -> Result<(), StoreError> {
        let mut record = self.live(id)?.clone();
        record.revoked_at = Some(now);
        record.same_second_tokens.clear();
        self.commit(record).map(drop)
    }

    /// Deletes an identity (and so revokes its tokens). Deleting an identity this emulator
    /// deleted before answers as a success again, as a retried DELETE should; an id it never
    /// created is not found.
    pub fn delete(&mut self, id: &str, now: Timestamp) -> Result<(), StoreError> {
        let mut record = self.identities.get(id).ok_or(StoreError::NotFound)?.clone();
        if record.is_deleted() {
            return Ok(());
        }
        record.deleted_at = Some(now);
        record.same_second_tokens.clear();
        if let Some(custom) = &record.custom_id {
            self.by_custom_id.remove(custom);
        }
        self.commit(record).map(drop)
    }

    /// Whether a token (already known to carry our signature) is still good at `now`.
    pub fn token_status(
        &self,
        id: &str,
        iat: i64,
        exp: i64,
        token: &str,
        now: Timestamp,
    ) -> TokenStatus {
        let Some(record) = self.identities.get(id) else {
            return TokenStatus::UnknownIdentity;
        };
        if record.is_deleted() {
            return TokenStatus::Deleted;
        }
        if let Some(revoked) = record.revoked_at {
            let after = iat > revoked.as_second()
                || (iat == revoked.as_second()
                    && record.same_second_tokens.contains(&token_hash(token)));
            if !after {
                return TokenStatus::Revoked;
            }
        }
        if now.as_second() >= exp {
            return TokenStatus::Expired;
        }
        TokenStatus::Valid
    }

    /// (alive, deleted)
    pub fn counts(&self) -> (usize, usize) {
        let deleted = self.identities.values().filter(|r| r.is_deleted()).count();
        (self.identities.len() - deleted, deleted)
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Creates a file only its owner can read: the state holds the token-signing key.
fn create_private(path: &Path) -> anyhow::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seconds: f64) -> Timestamp {
        Timestamp::from_millisecond((seconds * 1000.0) as i64).unwrap()
    }

    #[test]
    fn revocation_is_exact_within_the_revoking_second() {
        let mut store = Store::in_memory();
        store.create("8:acs:r_1".into(), None, t(100.0)).unwrap();
        store.record_issue("8:acs:r_1", t(100.2), "old").unwrap();
        store.revoke("8:acs:r_1", t(100.5)).unwrap();
        store.record_issue("8:acs:r_1", t(100.7), "new").unwrap();
        store.record_issue("8:acs:r_1", t(101.0), "later").unwrap();
        let status = |token, iat| store.token_status("8:acs:r_1", iat, 4000, token, t(102.0));
        assert_eq!(status("old", 100), TokenStatus::Revoked);
        assert_eq!(status("new", 100), TokenStatus::Valid);
        assert_eq!(status("later", 101), TokenStatus::Valid);
        assert_eq!(status("older", 99), TokenStatus::Revoked);
        assert_eq!(
            store.token_status("8:acs:r_1", 101, 150, "later", t(150.0)),
            TokenStatus::Expired
        );
        assert_eq!(
            store.token_status("8:acs:nope", 101, 4000, "x", t(102.0)),
            TokenStatus::UnknownIdentity
        );
        store.delete("8:acs:r_1", t(103.0)).unwrap();
        assert_eq!(
            store.token_status("8:acs:r_1", 101, 4000, "later", t(103.0)),
            TokenStatus::Deleted
        );
        assert!(matches!(
            store.revoke("8:acs:r_1", t(104.0)),
            Err(StoreError::NotFound)
        ));
        store.delete("8:acs:r_1", t(104.0)).unwrap();
        assert!(matches!(
            store.delete("8:acs:x", t(104.0)),
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.counts(), (0, 1));
    }

    #[test]
    fn the_journal_survives_a_restart_and_is_compacted() {
        let dir = std::env::temp_dir().join(format!("acs-emulator-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.jsonl");
        let _ = std::fs::remove_file(&path);
        let header = StateHeader {
            resource_id: "r".into(),
            signing_key: "a2V5".into(),
        };
        let loaded = load_state(&path).unwrap();
        assert!(loaded.header.is_none());
        let mut store = Store::persistent(&path, &header, loaded.records).unwrap();
        store
            .create("8:acs:r_1".into(), Some("alice".into()), t(1.0))
            .unwrap();
        store.create("8:acs:r_2".into(), None, t(2.0)).unwrap();
        store.record_issue("8:acs:r_1", t(3.0), "tok").unwrap();
        store.revoke("8:acs:r_1", t(4.0)).unwrap();
        store.delete("8:acs:r_2", t(5.0)).unwrap();
        drop(store);
        // A torn last line (the process died mid-write) is skipped.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":\"8:acs:r_")
            .unwrap();

        let loaded = load_state(&path).unwrap();
        assert_eq!(loaded.header.unwrap().resource_id, "r");
        assert_eq!(loaded.records.len(), 2);
        let store = Store::persistent(&path, &header, loaded.records).unwrap();
        assert_eq!(store.find_custom("alice").unwrap().id, "8:acs:r_1");
        let alice = store.live("8:acs:r_1").unwrap();
        assert_eq!(alice.revoked_at, Some(t(4.0)));
        assert_eq!(alice.last_token_issued_at, Some(t(3.0)));
        assert_eq!(store.counts(), (1, 1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().count(),
            3,
            "compacted: header + one line per identity"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
