//! How capsule persists state, in one place:
//!
//! - [`atomic`]: replace a file atomically (temp file in the same
//!   directory, mode 0600, fsync, rename, fsync of the directory), never
//!   following a symlink, with the file operations behind a seam
//!   ([`StateIo`]) so tests can inject a failure at each step;
//! - [`versioned`]: every state file is a JSON object with a numeric
//!   `"version"`; a file of another version, or one that does not parse, is
//!   refused loudly and never overwritten;
//! - [`private`]: state directories are 0700 and are never reached through
//!   a symlink.
#![forbid(unsafe_code)]

pub mod atomic;
pub mod private;
pub mod versioned;

pub use atomic::{replace, write_atomic, RealIo, StateIo};
pub use private::{create_private_dir, open_nofollow};
pub use versioned::{check_version, load, save, StateFileError, Versioned};
