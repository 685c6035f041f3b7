//! End-to-end encryption of op payloads with AES-256-GCM under the sync key that
//! central and every edge share, so request bodies (which carry passwords) never
//! cross a broker in clear. The op's seq and ID are bound in as associated data:
//! a payload cannot be replayed under another seq.

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
    #[error("malformed envelope data")]
    Malformed,
}

/// The sync key, or deliberately none (`--insecure-plaintext-sync`).
pub struct Sealer {
    key: Option<LessSafeKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.key.is_some() {
            "Sealer(aes-256-gcm)"
        } else {
            "Sealer(plaintext)"
        })
    }
}

/// A new random key, base64-encoded (`syncgate keygen`).
pub fn generate_key() -> String {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the system RNG works");
    B64.encode(key)
}

/// Checks a base64 key without keeping it.
pub fn validate_key(b64: &str) -> Result<(), KeyError> {
    Sealer::with_key(b64).map(|_| ())
}

impl Sealer {
    pub fn with_key(b64: &str) -> Result<Sealer, KeyError> {
        let raw = B64.decode(b64.trim()).map_err(|_| KeyError::Malformed)?;
        if raw.len() != 32 {
            return Err(KeyError::Malformed);
        }
        let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| KeyError::Malformed)?;
        Ok(Sealer {
            key: Some(LessSafeKey::new(key)),
            rng: SystemRandom::new(),
        })
    }

    pub fn plaintext() -> Sealer {
        Sealer {
            key: None,
            rng: SystemRandom::new(),
        }
    }

    /// Encrypts `plain`; returns (encoding, base64 data).
    pub fn seal(&self, aad: &str, plain: &[u8]) -> (&'static str, String) {
        let Some(key) = &self.key else {
            return (ENC_NONE, B64.encode(plain));
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
        (ENC_AES, B64.encode(out))
    }

    /// Decrypts what `seal` produced.
    pub fn open(&self, aad: &str, enc: &str, data: &str) -> Result<Vec<u8>, OpenError> {
        let raw = B64.decode(data).map_err(|_| OpenError::Malformed)?;
        match (enc, &self.key) {
            (ENC_NONE, None) => Ok(raw),
            (ENC_NONE, Some(_)) => Err(OpenError::Plaintext),
            (ENC_AES, None) => Err(OpenError::NoKey),
            (ENC_AES, Some(key)) => {
                if raw.len() < NONCE_LEN {
                    return Err(OpenError::Malformed);
                }
                let (nonce, sealed) = raw.split_at(NONCE_LEN);
                let nonce =
                    Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Malformed)?;
                let mut buf = sealed.to_vec();
                let plain = key
                    .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
                    .map_err(|_| OpenError::WrongKeyOrTampered)?;
                Ok(plain.to_vec())
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
        assert_eq!(enc, ENC_AES);
        assert!(!data.contains("pw"));
        assert_eq!(
            a.open("op:1", enc, &data).unwrap(),
            b"{\"password\":\"pw\"}"
        );
        assert_eq!(
            a.open("op:2", enc, &data),
            Err(OpenError::WrongKeyOrTampered)
        );
        let b = Sealer::with_key(&generate_key()).unwrap();
        assert_eq!(
            b.open("op:1", enc, &data),
            Err(OpenError::WrongKeyOrTampered)
        );
        assert_eq!(
            Sealer::plaintext().open("op:1", enc, &data),
            Err(OpenError::NoKey)
        );
        let (enc, data) = Sealer::plaintext().seal("op:1", b"x");
        assert_eq!(a.open("op:1", enc, &data), Err(OpenError::Plaintext));
        assert_eq!(Sealer::plaintext().open("op:1", enc, &data).unwrap(), b"x");
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
