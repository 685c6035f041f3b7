//! End-to-end encryption of op payloads with AES-256-GCM under the sync key that
//! central and every edge share, so request bodies (which carry passwords) never
//! cross a broker, or sit in an op log, in clear. Associated data binds what is
//! sealed to where it belongs (an op's seq, a control message's kind and edge).
//!
//! A sealer holds one or more keys: the first seals, every one opens. What is
//! sealed names its key by ID (`aes-256-gcm/<kid>`, the first 8 hex digits of
//! the key's SHA-256), so a key can be rotated: add the new key beside the old
//! everywhere, then make it first, then drop the old.
//!
//! An edge with a scope (see `keystone::scope`) holds an **edge key** instead
//! of the sync key: derived from it for that edge alone (HKDF-SHA256), written
//! `edge:<id>:<base64>` (`syncgate keygen --edge <id>`). It opens only what
//! central seals for that edge, never the ops every other edge receives.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// How an envelope's data is encoded.
pub const ENC_AES: &str = "aes-256-gcm";
pub const ENC_NONE: &str = "none";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the sync key must be 32 bytes, base64-encoded (make one with `syncgate keygen`)")]
    Malformed,
    #[error("an edge key is written edge:<edge id>:<32 bytes of base64> (made with `syncgate keygen --edge <id>`)")]
    MalformedEdgeKey,
    #[error("the keys of a list must all be sync keys, or all edge keys of one edge")]
    MixedKeys,
    #[error("an edge key is derived from the sync key, not from another edge key")]
    DeriveFromEdgeKey,
}

/// How an edge key is written: `edge:<id>:<base64>`.
const EDGE_KEY_TAG: &str = "edge:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("cannot decrypt: the sync key differs from the one the op was sealed with, or the data was altered")]
    WrongKeyOrTampered,
    #[error("the op is encrypted but this gateway has no sync key")]
    NoKey,
    #[error("the op is not encrypted but this gateway requires encryption (set --insecure-plaintext-sync on both sides to allow it)")]
    Plaintext,
    #[error("unknown encoding '{0}'")]
    UnknownEncoding(String),
    #[error(
        "sealed with key {0}, which this gateway does not have: the sync keys differ (see key rotation in the README)"
    )]
    UnknownKey(String),
    #[error("malformed envelope data")]
    Malformed,
}

/// The sync keys (the first seals, all open), or deliberately none
/// (`--insecure-plaintext-sync`).
pub struct Sealer {
    keys: Vec<(String, LessSafeKey)>,
    /// The raw keys, in the same order (an edge's keys are derived from them).
    raws: Vec<Raw>,
    /// The edge these are the edge keys of (None: the sync key).
    edge: Option<String>,
    rng: SystemRandom,
}

/// A raw key (held as long as the sealer, as its AES keys are).
struct Raw([u8; 32]);

/// HKDF's output length for a 32-byte key.
struct Len32;

impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// Edge `edge`'s key derived from one sync key.
fn derive(raw: &[u8; 32], edge: &str) -> [u8; 32] {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"syncgate edge key v1");
    let prk = salt.extract(raw);
    let info = [edge.as_bytes()];
    let okm = prk
        .expand(&info, Len32)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    let mut out = [0u8; 32];
    okm.fill(&mut out)
        .expect("the output buffer has the requested length");
    out
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.keys.first() {
            Some((kid, _)) => write!(
                f,
                "Sealer(aes-256-gcm, seals with {kid}, {} keys{})",
                self.keys.len(),
                match &self.edge {
                    Some(e) => format!(", edge keys of {e}"),
                    None => String::new(),
                }
            ),
            None => f.write_str("Sealer(plaintext)"),
        }
    }
}

/// A key's ID: the first 4 bytes of its SHA-256, in hex (names it, reveals nothing).
fn key_id(raw: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, raw).as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random key, base64-encoded (`syncgate keygen`).
pub fn generate_key() -> String {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the system RNG works");
    B64.encode(key)
}

/// Checks base64 keys (comma-separated) without keeping them.
pub fn validate_key(b64: &str) -> Result<(), KeyError> {
    Sealer::with_keys(b64).map(|_| ())
}

impl Sealer {
    pub fn with_key(b64: &str) -> Result<Sealer, KeyError> {
        Sealer::with_keys(b64)
    }

    /// Comma-separated base64 keys: the first seals, every one opens. Either
    /// sync keys, or edge keys (`edge:<id>:<base64>`) of one edge.
    pub fn with_keys(list: &str) -> Result<Sealer, KeyError> {
        let mut raws = Vec::new();
        let mut edges = Vec::new();
        for item in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let (edge, b64) = match item.strip_prefix(EDGE_KEY_TAG) {
                Some(rest) => {
                    let (edge, b64) = rest.split_once(':').ok_or(KeyError::MalformedEdgeKey)?;
                    if !super::messages::valid_edge_id(edge) {
                        return Err(KeyError::MalformedEdgeKey);
                    }
                    (Some(edge.to_string()), b64)
                }
                None => (None, item),
            };
            let malformed = if edge.is_some() {
                KeyError::MalformedEdgeKey
            } else {
                KeyError::Malformed
            };
            let raw: [u8; 32] = B64
                .decode(b64)
                .ok()
                .and_then(|r| r.try_into().ok())
                .ok_or(malformed)?;
            raws.push(Raw(raw));
            edges.push(edge);
        }
        if raws.is_empty() {
            return Err(KeyError::Malformed);
        }
        let edge = edges[0].clone();
        if edges.iter().any(|e| *e != edge) {
            return Err(KeyError::MixedKeys);
        }
        Ok(Sealer::of(raws, edge))
    }

    fn of(raws: Vec<Raw>, edge: Option<String>) -> Sealer {
        let keys = raws
            .iter()
            .map(|raw| {
                let key =
                    UnboundKey::new(&AES_256_GCM, &raw.0).expect("a 32-byte key is an AES-256 key");
                (key_id(&raw.0), LessSafeKey::new(key))
            })
            .collect();
        Sealer {
            keys,
            raws,
            edge,
            rng: SystemRandom::new(),
        }
    }

    pub fn plaintext() -> Sealer {
        Sealer {
            keys: Vec::new(),
            raws: Vec::new(),
            edge: None,
            rng: SystemRandom::new(),
        }
    }

    /// The edge these are the edge keys of (None: sync keys, or plaintext).
    pub fn edge(&self) -> Option<&str> {
        self.edge.as_deref()
    }

    /// Edge `edge`'s keys, derived from these sync keys (in the same order,
    /// so a rotation of the sync key rotates every edge's key with it).
    pub fn for_edge(&self, edge: &str) -> Result<Sealer, KeyError> {
        if self.edge.is_some() {
            return Err(KeyError::DeriveFromEdgeKey);
        }
        if self.raws.is_empty() {
            return Err(KeyError::Malformed);
        }
        let raws = self.raws.iter().map(|r| Raw(derive(&r.0, edge))).collect();
        Ok(Sealer::of(raws, Some(edge.to_string())))
    }

    /// Edge `edge`'s keys as `--sync-key` takes them (`syncgate keygen
    /// --edge`): `edge:<id>:<base64>`, comma-separated. A secret.
    pub fn edge_key_text(&self, edge: &str) -> Result<String, KeyError> {
        let derived = self.for_edge(edge)?;
        Ok(derived
            .raws
            .iter()
            .map(|r| format!("{EDGE_KEY_TAG}{edge}:{}", B64.encode(r.0)))
            .collect::<Vec<_>>()
            .join(","))
    }

    /// The ID of the key that seals (none in plaintext mode).
    pub fn sealing_key_id(&self) -> Option<&str> {
        self.keys.first().map(|(kid, _)| kid.as_str())
    }

    /// Whether this sealer encrypts at all.
    pub fn encrypts(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Encrypts `plain`; returns (encoding with key ID, base64 data).
    pub fn seal(&self, aad: &str, plain: &[u8]) -> (String, String) {
        let Some((kid, key)) = self.keys.first() else {
            return (ENC_NONE.to_string(), B64.encode(plain));
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the system RNG works");
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        )
        .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        (format!("{ENC_AES}/{kid}"), B64.encode(out))
    }

    /// Decrypts what `seal` produced.
    pub fn open(&self, aad: &str, enc: &str, data: &str) -> Result<Vec<u8>, OpenError> {
        let raw = B64.decode(data).map_err(|_| OpenError::Malformed)?;
        let (scheme, kid) = match enc.split_once('/') {
            Some((s, k)) => (s, Some(k)),
            None => (enc, None),
        };
        match (scheme, self.keys.is_empty()) {
            (ENC_NONE, true) => Ok(raw),
            (ENC_NONE, false) => Err(OpenError::Plaintext),
            (ENC_AES, true) => Err(OpenError::NoKey),
            (ENC_AES, false) => {
                if raw.len() < NONCE_LEN {
                    return Err(OpenError::Malformed);
                }
                let (nonce, sealed) = raw.split_at(NONCE_LEN);
                let candidates: Vec<&LessSafeKey> = match kid {
                    Some(kid) => {
                        let found: Vec<_> = self
                            .keys
                            .iter()
                            .filter(|(k, _)| k == kid)
                            .map(|(_, key)| key)
                            .collect();
                        if found.is_empty() {
                            return Err(OpenError::UnknownKey(kid.chars().take(16).collect()));
                        }
                        found
                    }
                    // Sealed before key IDs: any key may be the one.
                    None => self.keys.iter().map(|(_, key)| key).collect(),
                };
                for key in candidates {
                    let nonce = Nonce::try_assume_unique_for_key(nonce)
                        .map_err(|_| OpenError::Malformed)?;
                    let mut buf = sealed.to_vec();
                    if let Ok(plain) = key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
                    {
                        return Ok(plain.to_vec());
                    }
                }
                Err(OpenError::WrongKeyOrTampered)
            }
            (other, _) => Err(OpenError::UnknownEncoding(other.chars().take(32).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let key = generate_key();
        let a = Sealer::with_key(&key).unwrap();
        let (enc, data) = a.seal("op:1", b"{\"password\":\"pw\"}");
        assert!(enc.starts_with("aes-256-gcm/"), "{enc}");
        let enc = enc.as_str();
        // Nothing of the plaintext in the sealed bytes (a test of the text
        // for "pw" fails by chance: base64 of random bytes may spell it).
        let sealed = B64.decode(&data).unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"password"));
        assert_eq!(
            a.open("op:1", enc, &data).unwrap(),
            b"{\"password\":\"pw\"}"
        );
        assert_eq!(
            a.open("op:2", enc, &data),
            Err(OpenError::WrongKeyOrTampered)
        );
        let b = Sealer::with_key(&generate_key()).unwrap();
        assert!(matches!(
            b.open("op:1", enc, &data),
            Err(OpenError::UnknownKey(_))
        ));
        // Another key under the same ID (or data altered): refused all the same.
        let kid = enc.split('/').nth(1).unwrap();
        let relabelled = format!("aes-256-gcm/{kid}");
        let mut tampered = B64.decode(&data).unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            a.open("op:1", &relabelled, &B64.encode(tampered)),
            Err(OpenError::WrongKeyOrTampered)
        );
        assert_eq!(
            Sealer::plaintext().open("op:1", enc, &data),
            Err(OpenError::NoKey)
        );
        let (enc, data) = Sealer::plaintext().seal("op:1", b"x");
        assert_eq!(a.open("op:1", &enc, &data), Err(OpenError::Plaintext));
        assert_eq!(Sealer::plaintext().open("op:1", &enc, &data).unwrap(), b"x");
    }

    #[test]
    fn keys_rotate_the_first_seals_and_all_open() {
        let old = generate_key();
        let new = generate_key();
        let before = Sealer::with_keys(&old).unwrap();
        let (enc_old, data_old) = before.seal("a", b"old");
        // Step 1: the new key beside the old; still sealing with the old.
        let both = Sealer::with_keys(&format!("{old},{new}")).unwrap();
        assert_eq!(both.sealing_key_id(), before.sealing_key_id());
        // Step 2: the new key first.
        let flipped = Sealer::with_keys(&format!("{new}, {old}")).unwrap();
        let (enc_new, data_new) = flipped.seal("a", b"new");
        assert_ne!(enc_new, enc_old);
        for s in [&both, &flipped] {
            assert_eq!(s.open("a", &enc_old, &data_old).unwrap(), b"old");
            assert_eq!(s.open("a", &enc_new, &data_new).unwrap(), b"new");
        }
        // Step 3: the old key dropped: what it sealed names a key not held.
        let after = Sealer::with_keys(&new).unwrap();
        assert!(matches!(
            after.open("a", &enc_old, &data_old),
            Err(OpenError::UnknownKey(_))
        ));
        // Sealed before key IDs: tried with every key.
        assert_eq!(both.open("a", ENC_AES, &data_old).unwrap(), b"old");
        assert!(Sealer::with_keys(&format!("{old},short")).is_err());
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert_eq!(validate_key("short").unwrap_err(), KeyError::Malformed);
        assert_eq!(
            validate_key(&B64.encode([0u8; 16])).unwrap_err(),
            KeyError::Malformed
        );
        assert!(validate_key(&generate_key()).is_ok());
    }

    /// An edge key opens what central seals with it and nothing sealed with
    /// the sync key or another edge's key; it is written with its edge, and a
    /// rotation of the sync key rotates it.
    #[test]
    fn an_edge_key_opens_only_what_is_sealed_for_its_edge() {
        let (old, new) = (generate_key(), generate_key());
        let central = Sealer::with_keys(&format!("{new},{old}")).unwrap();
        let text = central.edge_key_text("site2").unwrap();
        assert!(!text.contains(&new) && !text.contains(&old));
        assert_eq!(text.split(',').count(), 2, "one edge key per sync key");
        let edge = Sealer::with_keys(&text).unwrap();
        assert_eq!(edge.edge(), Some("site2"));
        let at_central = central.for_edge("site2").unwrap();
        assert_eq!(at_central.sealing_key_id(), edge.sealing_key_id());
        let (enc, data) = at_central.seal("a", b"for site2");
        assert_eq!(edge.open("a", &enc, &data).unwrap(), b"for site2");
        // What every other edge receives, and what another edge's key seals.
        let (enc, data) = central.seal("a", b"for all");
        assert!(edge.open("a", &enc, &data).is_err());
        let (enc, data) = central.for_edge("site3").unwrap().seal("a", b"for site3");
        assert!(edge.open("a", &enc, &data).is_err());
        // The same sync key derives the same edge key; the old sync key's
        // edge key opens what it sealed (rotation).
        let old_only = Sealer::with_keys(&old).unwrap().for_edge("site2").unwrap();
        let (enc, data) = old_only.seal("a", b"old");
        assert_eq!(edge.open("a", &enc, &data).unwrap(), b"old");
        // Refused: a malformed edge key, keys of two edges or of both kinds,
        // an edge key derived again.
        for bad in ["edge:site2", "edge:site 2:abc", "edge:site2:short"] {
            assert_eq!(
                Sealer::with_keys(bad).unwrap_err(),
                KeyError::MalformedEdgeKey,
                "{bad}"
            );
        }
        let other = Sealer::with_keys(&new)
            .unwrap()
            .edge_key_text("site3")
            .unwrap();
        let mixed = [format!("{text},{other}"), format!("{new},{text}")];
        for list in mixed {
            assert_eq!(Sealer::with_keys(&list).unwrap_err(), KeyError::MixedKeys);
        }
        assert_eq!(
            edge.for_edge("site3").unwrap_err(),
            KeyError::DeriveFromEdgeKey
        );
        assert!(!format!("{edge:?}").contains(&text));
    }
}
