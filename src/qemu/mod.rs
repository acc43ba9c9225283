//! QEMU as data and as a program: its command line built with no I/O
//! ([`args`]; a port forward's rule in [`forward`]), disk images ([`image`]), readers of its output ([`parse`]),
//! and the binaries and KVM on this host ([`host`]).

pub mod args;
pub mod forward;
pub mod host;
pub mod image;
pub mod parse;
