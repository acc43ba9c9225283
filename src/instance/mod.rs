//! One instance on disk: where its files are ([`paths`]), the lock held for
//! the VM's whole life ([`lock`]), whether it runs ([`liveness`]), the JSON records that survive QEMU
//! ([`records`]), process identities ([`proc`]), and the one check that the
//! state dir is the running user's ([`owner`]).

pub mod liveness;
pub mod lock;
pub mod owner;
pub mod paths;
pub mod proc;
pub mod records;
pub mod stops;

pub use liveness::Liveness;
pub use lock::Lock;
pub use paths::{default_state_dir, private_dir, validate_name, Instance, StateDir};
pub use records::{read_json, write_atomic, write_json};
