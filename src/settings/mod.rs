//! Typed configuration: what each command runs with, validated once at
//! start-up. The command line that fills it is `cli`, above everything.

pub mod config;
