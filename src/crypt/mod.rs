//! Client-side encryption of every object (`proto/encryption.md`): AES-256-GCM with a random
//! data key per object, wrapped by a key of the keyring.
//!
//! * [`envelope`]: the byte format of one encrypted object (pure);
//! * [`keyring`]: the keyring file and the secret types (`Debug` prints `[redacted]`);
//! * [`codec`]: the [`crate::object::Codec`] that seals and opens objects with a keyring.
//!
//! Does not own where objects are written ([`crate::object`] applies the codec once per
//! object, above every retry) nor the repository's record of being encrypted
//! ([`crate::catalog::identity`]).

pub mod codec;
pub mod envelope;
mod error;
pub mod keyring;

pub use codec::Sealed;
pub use error::CryptError;
pub use keyring::{Key, KeyId, Keyring, RemoveError, SecretKey};

#[cfg(test)]
mod tests;
