//! WireGuard keys and secret strings: now in `cloak_model::secret`, re-exported here.

pub use cloak_model::secret::{Key, KeyError, PublicKey, Secret};
