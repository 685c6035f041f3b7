//! The ground floor: what every part of the gateway uses and that uses no
//! other part of it.

pub mod admin;
mod secret;

pub use secret::{read_secret, Secret};
