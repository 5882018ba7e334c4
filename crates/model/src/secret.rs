//! Secret material: zeroized on drop, `<redacted>` in `Debug` and `Display`. The only way to the
//! bytes is an explicit accessor, so a stray `{:?}` in a log line cannot leak a key.

use std::fmt;

use base64::Engine;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A secret string (a password, a whole config file holding inline keys).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The secret itself; call only where it is handed to the kernel or a child's stdin.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A 32-byte WireGuard key (private or preshared), parsed from base64 once.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

/// Why a key did not parse. Never includes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key (expected 32 bytes in base64, 44 characters)")]
pub struct KeyError;

impl Key {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError)?,
        );
        let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError)?;
        Ok(Self(array))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Hex, as the WireGuard cross-platform UAPI wants it.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    /// Base64, as `wg setconf` wants it.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0))
    }

    /// The public key of this private key.
    pub fn public(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// A fresh random private key (tests and the fake providers). The one place this crate
    /// touches the OS: its random number generator.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        Self(secret.to_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A WireGuard public key: not secret, printed in base64 like `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError)?;
        Ok(Self(bytes.as_slice().try_into().map_err(|_| KeyError)?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let key = Key::generate();
        let secret = Secret::new("hunter2".into());
        assert_eq!(
            format!("{key:?} {secret:?} {secret}"),
            "<redacted> <redacted> <redacted>"
        );
    }

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        let key = Key::generate();
        assert_eq!(Key::from_base64(&key.to_base64()).ok(), Some(key.clone()));
        assert_eq!(
            PublicKey::from_base64(&key.public().to_string()),
            Ok(key.public())
        );
        assert_eq!(Key::from_base64("c2hvcnQ="), Err(KeyError));
        assert_eq!(Key::from_base64("not base64!"), Err(KeyError));
    }
}
