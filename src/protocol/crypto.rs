//! End-to-end encryption of op payloads with AES-256-GCM under the sync key that
//! central and every edge share, so request bodies (which carry passwords) never
//! cross a broker, or sit in an op log, in clear. Associated data binds what is
//! sealed to where it belongs (an op's seq, a control message's kind and edge).
//!
//! A sealer holds one or more keys: the first seals, every one opens. What is
//! sealed names its key by ID (`aes-256-gcm/<kid>`, the first 8 hex digits of
//! the key's SHA-256), so a key can be rotated: add the new key beside the old
//! everywhere, then make it first, then drop the old.

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
}

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
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.keys.first() {
            Some((kid, _)) => write!(
                f,
                "Sealer(aes-256-gcm, seals with {kid}, {} keys)",
                self.keys.len()
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

    /// Comma-separated base64 keys: the first seals, every one opens.
    pub fn with_keys(list: &str) -> Result<Sealer, KeyError> {
        let mut keys = Vec::new();
        for b64 in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let raw = B64.decode(b64).map_err(|_| KeyError::Malformed)?;
            if raw.len() != 32 {
                return Err(KeyError::Malformed);
            }
            let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| KeyError::Malformed)?;
            keys.push((key_id(&raw), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(KeyError::Malformed);
        }
        Ok(Sealer {
            keys,
            rng: SystemRandom::new(),
        })
    }

    pub fn plaintext() -> Sealer {
        Sealer {
            keys: Vec::new(),
            rng: SystemRandom::new(),
        }
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
}
